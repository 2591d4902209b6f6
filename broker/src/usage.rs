//! Tokens used by a brokered request, read from the provider's own answer as it streams past:
//! a JSON body (`usage`; or a JSON array of chunks, Gemini's stream without `alt=sse`), or each
//! `data:` event of a server-sent-event stream (OpenAI's final `usage` chunk, the Responses
//! API's `response.usage`, Anthropic's `message_start` and `message_delta`, Gemini's
//! `usageMetadata`). Counts in streams are cumulative, so the meter keeps the largest seen of
//! each. A JSON answer too large to hold is followed byte by byte to keep only the values of its
//! top-level usage keys ([`LargeAnswer`]); a stream's events are counted, for the estimate made
//! when an answer carried no usage (agents.rs).

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// The most of one JSON answer, or of one stream line, the meter holds to read usage from.
const MAX_HELD_BYTES: usize = 4 << 20;

/// The largest usage object kept of an answer larger than [`MAX_HELD_BYTES`].
const MAX_USAGE_BYTES: usize = 64 << 10;

/// Tokens in and out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens, cached ones included.
    pub input: u64,
    /// Completion (output) tokens.
    pub output: u64,
}

impl Usage {
    /// Both together.
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }

    fn merge_max(&mut self, other: Usage) {
        self.input = self.input.max(other.input);
        self.output = self.output.max(other.output);
    }
}

/// What the meter read of a whole answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Read {
    /// The usage the answer carried, if it carried any.
    pub usage: Option<Usage>,
    /// The `data:` events of a stream.
    pub events: u64,
}

/// Reads usage from an answer's body, piece by piece.
#[derive(Debug)]
pub struct UsageMeter {
    stream: bool,
    held: Vec<u8>,
    overflowed: bool,
    /// A JSON answer larger than [`MAX_HELD_BYTES`], followed instead of held.
    large: LargeAnswer,
    events: u64,
    usage: Usage,
    found: bool,
}

impl UsageMeter {
    /// A meter for an answer of `content_type`.
    pub fn new(content_type: &str) -> UsageMeter {
        UsageMeter {
            stream: content_type.starts_with("text/event-stream"),
            held: Vec::new(),
            overflowed: false,
            large: LargeAnswer::default(),
            events: 0,
            usage: Usage::default(),
            found: false,
        }
    }

    /// Feeds the next piece of the body.
    pub fn feed(&mut self, piece: &[u8]) {
        if !self.stream {
            if !self.overflowed && self.held.len() + piece.len() <= MAX_HELD_BYTES {
                self.held.extend_from_slice(piece);
                return;
            }
            if !self.overflowed {
                self.overflowed = true;
                let held = std::mem::take(&mut self.held);
                self.large.feed(&held);
            }
            self.large.feed(piece);
            return;
        }
        let mut rest = piece;
        while let Some(end) = memchr::memchr(b'\n', rest) {
            if self.overflowed {
                self.overflowed = false;
            } else if self.held.is_empty() {
                // The whole line is in this piece: read it where it is.
                self.line(&rest[..end]);
            } else {
                let mut line = std::mem::take(&mut self.held);
                line.extend_from_slice(&rest[..end]);
                self.line(&line);
                line.clear();
                self.held = line;
            }
            rest = &rest[end + 1..];
        }
        if self.held.len() + rest.len() > MAX_HELD_BYTES {
            self.overflowed = true;
            self.held = Vec::new();
        } else if !self.overflowed {
            self.held.extend_from_slice(rest);
        }
    }

    /// What was read, once the body ended (or was cut).
    pub fn finish(mut self) -> Read {
        if self.stream {
            let line = std::mem::take(&mut self.held);
            self.line(&line);
        } else if self.overflowed {
            if let Some(u) = self.large.usage {
                self.found = true;
                self.usage.merge_max(u);
            }
        } else {
            let held = std::mem::take(&mut self.held);
            // A JSON array of chunks: Gemini's `streamGenerateContent` without `alt=sse`.
            let chunks = (held.trim_ascii_start().first() == Some(&b'['))
                .then(|| serde_json::from_slice::<Vec<&RawValue>>(&held).ok())
                .flatten();
            match chunks {
                Some(chunks) => chunks.iter().for_each(|c| self.event(c.get().as_bytes())),
                None => self.event(&held),
            }
        }
        Read {
            usage: self.found.then_some(self.usage),
            events: self.events,
        }
    }

    fn line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        self.events += 1;
        // Most events of a stream carry text, not usage: parse only those that may.
        if memchr::memmem::find(data, b"sage").is_none() {
            return;
        }
        self.event(data.trim_ascii());
    }

    /// Reads the usage a JSON answer or event carries. Only the four places usage can be are
    /// read into values; the rest (an embeddings answer can be megabytes of numbers) is skipped
    /// without building anything.
    fn event(&mut self, json: &[u8]) {
        let Ok(at) = serde_json::from_slice::<Carriers<'_>>(json) else {
            return;
        };
        for raw in [
            at.usage,
            nested(at.message),
            nested(at.response),
            at.usage_metadata,
        ]
        .into_iter()
        .flatten()
        {
            let Ok(v) = serde_json::from_str::<Value>(raw.get()) else {
                continue;
            };
            if let Some(u) = usage_of(&v) {
                self.found = true;
                self.usage.merge_max(u);
            }
        }
    }
}

/// Follows a JSON answer too large to hold, piece by piece, keeping the values of its own
/// `usage` and `usageMetadata` keys: those of the top-level object, or of each element of a
/// top-level array (Gemini's stream without `alt=sse`). Keys deeper down are not the answer's
/// own (a Gemini function call's arguments are an object the model writes) and text is in
/// strings, so neither can add or lower a count.
#[derive(Debug, Default)]
struct LargeAnswer {
    /// How deep in objects and arrays the byte read is.
    depth: usize,
    /// The depth of the objects whose keys count: 1, or 2 in a top-level array.
    own: Option<usize>,
    in_string: bool,
    escaped: bool,
    /// The string being read, while it may be a key that counts (at most 16 bytes).
    string: Option<Vec<u8>>,
    /// The last string read at the owning depth names usage: its value is kept if an object.
    named: bool,
    /// The usage object being read.
    value: Option<Vec<u8>>,
    /// The largest counts of the usage objects read so far.
    usage: Option<Usage>,
}

impl LargeAnswer {
    fn feed(&mut self, piece: &[u8]) {
        for &b in piece {
            if let Some(value) = self.value.as_mut() {
                value.push(b);
                if value.len() > MAX_USAGE_BYTES {
                    self.value = None;
                }
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if let Some(name) = self.string.take() {
                        self.named = name == b"usage" || name == b"usageMetadata";
                    }
                    continue;
                }
                if let Some(name) = self.string.as_mut() {
                    name.push(b);
                    if name.len() > 16 {
                        self.string = None;
                    }
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    let owning = self.own == Some(self.depth) && self.value.is_none();
                    self.string = owning.then(Vec::new);
                }
                b'{' | b'[' => {
                    if self.own.is_none() {
                        self.own = Some(if b == b'[' { 2 } else { 1 });
                    }
                    if b == b'{' && self.named && self.own == Some(self.depth) {
                        self.value = Some(vec![b'{']);
                    }
                    self.named = false;
                    self.depth += 1;
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    self.named = false;
                    if self.own == Some(self.depth)
                        && let Some(value) = self.value.take()
                    {
                        let value = serde_json::from_slice::<Value>(&value).ok();
                        if let Some(u) = value.as_ref().and_then(usage_of) {
                            self.usage.get_or_insert_default().merge_max(u);
                        }
                    }
                }
                b',' => self.named = false,
                _ => {}
            }
        }
    }
}

/// Where usage may be in an answer or event: `usage`, `message.usage` (Anthropic's
/// `message_start`), `response.usage` (the Responses API), `usageMetadata` (Gemini). Other
/// fields are skipped unread.
#[derive(Deserialize)]
struct Carriers<'a> {
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    response: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "usageMetadata")]
    usage_metadata: Option<&'a RawValue>,
}

/// An object that may hold `usage`.
#[derive(Deserialize)]
struct Nested<'a> {
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
}

/// `usage` of the object `raw`, if it is one and has it.
fn nested(raw: Option<&RawValue>) -> Option<&RawValue> {
    serde_json::from_str::<Nested<'_>>(raw?.get()).ok()?.usage
}

fn usage_of(v: &Value) -> Option<Usage> {
    let obj = v.as_object()?;
    let count = |keys: &[&str]| -> u64 {
        keys.iter()
            .filter_map(|k| obj.get(*k)?.as_u64())
            .fold(0, u64::saturating_add)
    };
    // Gemini counts apart what OpenAI and Anthropic count within: tool-use prompts, thoughts.
    let input = count(&[
        "prompt_tokens",
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "promptTokenCount",
        "toolUsePromptTokenCount",
    ]);
    let output = count(&[
        "completion_tokens",
        "output_tokens",
        "candidatesTokenCount",
        "thoughtsTokenCount",
    ]);
    let known = [
        "prompt_tokens",
        "input_tokens",
        "completion_tokens",
        "output_tokens",
        "promptTokenCount",
        "candidatesTokenCount",
    ];
    known
        .iter()
        .any(|k| obj.contains_key(*k))
        .then_some(Usage { input, output })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(content_type: &str, body: &str, piece: usize) -> Option<Usage> {
        meter(content_type, body, piece).usage
    }

    fn meter(content_type: &str, body: &str, piece: usize) -> Read {
        let mut meter = UsageMeter::new(content_type);
        for chunk in body.as_bytes().chunks(piece) {
            meter.feed(chunk);
        }
        meter.finish()
    }

    #[test]
    fn openai_json_and_its_final_stream_chunk() {
        let json =
            r#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        for piece in [1, 7, 1000] {
            assert_eq!(
                read("application/json", json, piece),
                Some(Usage {
                    input: 12,
                    output: 30
                })
            );
        }
        let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                   data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}\n\n\
                   data: [DONE]\n\n";
        for piece in [1, 3, 4096] {
            assert_eq!(
                read("text/event-stream; charset=utf-8", sse, piece),
                Some(Usage {
                    input: 5,
                    output: 9
                })
            );
        }
    }

    #[test]
    fn anthropic_stream_takes_input_from_the_start_and_output_from_the_last_delta() {
        let sse = "event: message_start\n\
                   data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
                   event: message_delta\n\
                   data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n\
                   event: message_delta\n\
                   data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":40}}\n\n";
        assert_eq!(
            read("text/event-stream", sse, 5),
            Some(Usage {
                input: 25,
                output: 40
            })
        );
    }

    #[test]
    fn a_large_embeddings_answer_is_counted() {
        let vector = vec!["0.0123456"; 200_000].join(",");
        let json = format!(
            r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":[{vector}]}}],"model":"m","usage":{{"prompt_tokens":8,"total_tokens":8}}}}"#
        );
        assert_eq!(
            read("application/json", &json, 16 << 10),
            Some(Usage {
                input: 8,
                output: 0
            })
        );
    }

    #[test]
    fn an_answer_larger_than_what_is_held_is_counted_from_its_own_usage() {
        let vector = vec!["0.0123456"; 1_000_000].join(",");
        // A made-up usage in the content is a string, and others are keys of an object the
        // model writes (a function call's arguments), one huge, one near 2^64: none counts.
        let json = format!(
            r#"{{"data":[{{"embedding":[{vector}],"text":"\"usage\": {{\"prompt_tokens\":1}}","args":{{"usage":{{"prompt_tokens":99999999}},"x":{{"usage":{{"prompt_tokens":18446744073709551615}}}}}}}}],"usage" : {{"prompt_tokens":4000,"total_tokens":4000}}}}"#
        );
        assert!(json.len() > MAX_HELD_BYTES);
        for piece in [16 << 10, 1 << 20] {
            assert_eq!(
                read("application/json", &json, piece),
                Some(Usage {
                    input: 4000,
                    output: 0
                })
            );
        }
        let gemini = format!(
            r#"{{"candidates":[{{"content":{{"parts":[{{"text":"{}"}}]}}}}],"usageMetadata":{{"promptTokenCount":9,"candidatesTokenCount":1200000}}}}"#,
            "x".repeat(5 << 20)
        );
        assert_eq!(
            read("application/json", &gemini, 64 << 10),
            Some(Usage {
                input: 9,
                output: 1_200_000
            })
        );
        // Gemini's stream without `alt=sse`, too large: each element's own usage counts.
        let array = format!(
            r#"[{{"candidates":[{{"text":"{}"}}],"usageMetadata":{{"promptTokenCount":9,"candidatesTokenCount":1}}}},
               {{"candidates":[],"usageMetadata":{{"promptTokenCount":9,"candidatesTokenCount":2}}}}]"#,
            "x".repeat(5 << 20)
        );
        assert_eq!(
            read("application/json", &array, 64 << 10),
            Some(Usage {
                input: 9,
                output: 2
            })
        );
    }

    #[test]
    fn a_stream_cut_before_its_usage_counts_its_events() {
        let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                   data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n";
        assert_eq!(
            meter("text/event-stream", sse, 7),
            Read {
                usage: None,
                events: 2
            }
        );
    }

    #[test]
    fn gemini_and_responses_api_and_an_answer_without_usage() {
        let gemini = r#"{"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":2}}"#;
        assert_eq!(
            read("application/json", gemini, 4),
            Some(Usage {
                input: 8,
                output: 2
            })
        );
        // A thinking model's thoughts and tool-use prompts are counted apart from the answer.
        let thinking = r#"{"usageMetadata":{"promptTokenCount":8,"toolUsePromptTokenCount":3,"candidatesTokenCount":2,"thoughtsTokenCount":900}}"#;
        assert_eq!(
            read("application/json", thinking, 4),
            Some(Usage {
                input: 11,
                output: 902
            })
        );
        // Without `alt=sse`, Gemini streams one JSON array of cumulative chunks.
        let array = r#" [{"candidates":[],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":1}},
                         {"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":2}}]"#;
        assert_eq!(
            read("application/json", array, 5),
            Some(Usage {
                input: 8,
                output: 2
            })
        );
        let responses = "data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}}\n";
        assert_eq!(
            read("text/event-stream", responses, 2),
            Some(Usage {
                input: 3,
                output: 4
            })
        );
        assert_eq!(read("application/json", r#"{"data":[]}"#, 3), None);
        // A `message` that is text (an error answer) does not hide the usage beside it.
        assert_eq!(
            read(
                "application/json",
                r#"{"message":"rate limited","usage":{"input_tokens":7}}"#,
                9
            ),
            Some(Usage {
                input: 7,
                output: 0
            })
        );
        assert_eq!(read("application/json", "not json", 3), None);
    }
}
