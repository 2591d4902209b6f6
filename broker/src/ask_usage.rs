//! Streams that would carry no usage. An OpenAI chat completion streamed (`"stream": true`)
//! reports its tokens only when the request asks (`stream_options.include_usage`), which the
//! SDKs do not by default: such a stream would be counted at 0 tokens and a `tokens_per_day`
//! budget would never be reached. The broker asks for usage on the agent's behalf and, since
//! the agent did not ask, takes the extra chunk that carries it (no choices, only `usage`)
//! out of the stream after the meter has read it, so code that reads `choices[0]` of every
//! chunk is not surprised. Work that a provider bills after its answer, which so carries no
//! usage (a background response), is refused ([`unmetered`]).

use bytes::Bytes;
use hyper::Method;
use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The most of one unfinished event held back before the stream is passed through as it
/// comes (a stream that never ends an event is not held).
const MAX_HELD_BYTES: usize = 4 << 20;

/// The body of `method path` with `stream_options.include_usage` set, when it is a streamed
/// chat completion that does not ask for usage; `None` to send it as it is.
pub fn ask_for_usage(method: &Method, path: &str, body: &[u8]) -> Option<Bytes> {
    if method != Method::POST || !path.ends_with("/chat/completions") {
        return None;
    }
    let mut request = fields(body)?;
    if request.get("stream").map(|v| v.get().trim()) != Some("true") {
        return None;
    }
    // Anything but an object (`null`) would be sent on as it is, asking for nothing.
    let mut options: Map<String, Value> = request
        .get("stream_options")
        .and_then(|v| serde_json::from_str(v.get()).ok())
        .unwrap_or_default();
    if options.get("include_usage") == Some(&Value::Bool(true)) {
        return None;
    }
    options.insert("include_usage".into(), Value::Bool(true));
    let options = serde_json::value::to_raw_value(&options).ok()?;
    request.insert("stream_options".into(), &options);
    serde_json::to_vec(&request).ok().map(Bytes::from)
}

/// A request body's top-level fields as the provider reads them: keys unescaped (`"\u0073tream"`
/// is `stream`), the last of a repeated key winning; values left unparsed (a body can be
/// megabytes of images).
fn fields(body: &[u8]) -> Option<BTreeMap<String, &RawValue>> {
    serde_json::from_slice(body).ok()
}

/// Why `method path` with `body` may not go through, when its answer would carry no usage for
/// work billed later: a background response (OpenAI's Responses API, `"background": true`)
/// answers at once with `usage: null` and runs on; nothing counts what it spends.
pub fn unmetered(method: &Method, path: &str, body: &[u8]) -> Option<&'static str> {
    if method != Method::POST || !path.ends_with("/responses") {
        return None;
    }
    (fields(body)?.get("background").map(|v| v.get().trim()) == Some("true"))
        .then_some("background responses are billed after their answer, which carries no usage a budget could count")
}

/// Whether a successful call to `path` costs no tokens, so its answer (which carries no usage)
/// counts no estimate: counting tokens, moderation.
pub fn free(path: &str) -> bool {
    path.ends_with("/count_tokens")
        || path.ends_with(":countTokens")
        || path.ends_with("/moderations")
}

/// Takes the usage-only chunk out of a server-sent-event stream, event by event: what comes
/// through is every complete event but that one, and an unfinished event waits for its end.
#[derive(Debug, Default)]
pub struct HideUsageChunk {
    /// Bytes not passed on yet: the start of an unfinished event.
    held: Vec<u8>,
    /// How much of `held` has been looked through for line ends.
    scanned: usize,
    /// An event grew past [`MAX_HELD_BYTES`]: everything passes as it comes from then on.
    passing: bool,
}

impl HideUsageChunk {
    /// What of the stream, with `piece` its next bytes, goes to the agent now.
    pub fn filter(&mut self, piece: &[u8]) -> Bytes {
        if self.passing {
            return Bytes::copy_from_slice(piece);
        }
        self.held.extend_from_slice(piece);
        let mut shown = Vec::new();
        // Events end at an empty line (`\n\n` or `\r\n\r\n`).
        let (mut event_start, mut line_start) = (0, self.scanned);
        while let Some(at) = memchr::memchr(b'\n', &self.held[line_start..]) {
            let line_end = line_start + at + 1;
            if matches!(&self.held[line_start..line_end], b"\n" | b"\r\n") {
                let event = &self.held[event_start..line_end];
                if !usage_only(event) {
                    shown.extend_from_slice(event);
                }
                event_start = line_end;
            }
            line_start = line_end;
        }
        self.held.drain(..event_start);
        self.scanned = line_start - event_start;
        if self.held.len() > MAX_HELD_BYTES {
            self.passing = true;
            shown.append(&mut self.held);
        }
        Bytes::from(shown)
    }

    /// What is left when the stream ends (an unfinished last event, passed as it is).
    pub fn finish(&mut self) -> Bytes {
        self.scanned = 0;
        Bytes::from(std::mem::take(&mut self.held))
    }

    /// Whether nothing is held back.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Whether `event` is the chunk OpenAI adds for `include_usage`: no choices, a usage object.
fn usage_only(event: &[u8]) -> bool {
    // Only that chunk has an empty list of choices: parse no other.
    let finder = |needle: &[u8]| memchr::memmem::find(event, needle).is_some();
    if !(finder(b"\"choices\":[]") || finder(b"\"choices\": []")) {
        return false;
    }
    let data: Vec<u8> = event
        .split(|b| *b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .flat_map(|d| d.trim_ascii().iter().copied().chain([b'\n']))
        .collect();
    serde_json::from_slice::<Map<String, Value>>(&data).is_ok_and(|chunk| {
        chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
            && chunk.get("usage").is_some_and(Value::is_object)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hello \"}}],\"usage\":null}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"streamed\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7}}\n\n\
        data: [DONE]\n\n";

    fn shown(stream: &str, piece_len: usize) -> String {
        let mut hide = HideUsageChunk::default();
        let mut out = Vec::new();
        for piece in stream.as_bytes().chunks(piece_len) {
            out.extend_from_slice(&hide.filter(piece));
        }
        out.extend_from_slice(&hide.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_streamed_chat_without_usage_asks_for_it_and_nothing_else_is_changed() {
        let post = |path: &str, body: &str| {
            ask_for_usage(&Method::POST, path, body.as_bytes())
                .map(|b| serde_json::from_slice::<Value>(&b).unwrap())
        };
        let asked = post(
            "/v1/chat/completions",
            r#"{"model":"m","stream":true,"stream_options":{"x":1},"temperature":0.7}"#,
        )
        .unwrap();
        assert_eq!(asked["stream_options"]["include_usage"], true);
        assert_eq!(asked["stream_options"]["x"], 1);
        assert_eq!(asked["temperature"], 0.7);
        let azure = "/openai/deployments/d/chat/completions";
        assert!(post(azure, r#"{"stream":true}"#).is_some());
        let null = post(
            "/v1/chat/completions",
            r#"{"stream":true,"stream_options":null}"#,
        );
        assert_eq!(null.unwrap()["stream_options"]["include_usage"], true);
        // An escaped key, a repeated one: read as the provider reads them.
        for tricky in [
            r#"{"\u0073tream":true}"#,
            r#"{ "stream" : true , "model": "m" }"#,
            r#"{"stream":false,"stream":true,"stream_options":{"include_usage":true},"stream_options":{}}"#,
        ] {
            let asked = post("/v1/chat/completions", tricky).unwrap();
            assert_eq!(asked["stream_options"]["include_usage"], true, "{tricky}");
        }
        let already = r#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        assert!(post("/v1/chat/completions", already).is_none());
        assert!(post("/v1/chat/completions", r#"{"stream":false}"#).is_none());
        assert!(post("/v1/chat/completions", "not json, stream").is_none());
        assert!(post("/v1/responses", r#"{"stream":true}"#).is_none());
        assert!(
            ask_for_usage(&Method::GET, "/v1/chat/completions", b"{\"stream\":true}").is_none()
        );
    }

    #[test]
    fn calls_that_cost_no_tokens_are_known() {
        assert!(free("/v1/messages/count_tokens"));
        assert!(free("/v1beta/models/gemini-2.0-flash:countTokens"));
        assert!(free("/v1/moderations"));
        assert!(!free("/v1/messages"));
        assert!(!free("/v1/chat/completions"));
    }

    #[test]
    fn a_background_response_is_refused() {
        let post = |path: &str, body: &str| unmetered(&Method::POST, path, body.as_bytes());
        assert!(post("/v1/responses", r#"{"model":"m","background":true}"#).is_some());
        assert!(post("/openai/v1/responses", r#"{"background":true}"#).is_some());
        assert!(post("/v1/responses", r#"{"background":false}"#).is_none());
        assert!(post("/v1/responses", r#"{"input":"background"}"#).is_none());
        assert!(post("/v1/responses", r#"{"backgroun\u0064":true}"#).is_some());
        let repeated = r#"{"background":false,"background":true}"#;
        assert!(post("/v1/responses", repeated).is_some());
        assert!(post("/v1/chat/completions", r#"{"background":true}"#).is_none());
    }

    #[test]
    fn the_usage_chunk_is_taken_out_wherever_the_pieces_break() {
        let want = STREAM.replace(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7}}\n\n",
            "",
        );
        for piece_len in [1, 2, 7, 64, STREAM.len()] {
            assert_eq!(shown(STREAM, piece_len), want, "pieces of {piece_len}");
        }
        let crlf = STREAM.replace('\n', "\r\n");
        assert_eq!(shown(&crlf, 5), want.replace('\n', "\r\n"));
    }

    #[test]
    fn other_events_pass_and_an_endless_event_is_not_held() {
        let other = "event: x\ndata: {\"choices\":[],\"note\":\"no usage\"}\n\ndata: unfinished";
        assert_eq!(shown(other, 3), other);
        let mut hide = HideUsageChunk::default();
        let endless = vec![b'a'; MAX_HELD_BYTES + 1];
        assert_eq!(hide.filter(&endless).len(), endless.len());
        assert_eq!(&hide.filter(b"data: more")[..], b"data: more");
        assert!(hide.is_empty());
    }
}
