// Fetch a secret from keywarden's agent socket with Node's standard library only.
const http = require("http");

function fetchSecret(socketPath, name, ttl = 300) {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, path: `/v1/secrets/${name}?ttl=${ttl}` }, (res) => {
      let data = "";
      res.on("data", (chunk) => (data += chunk));
      res.on("end", () => {
        const body = JSON.parse(data || "{}");
        if (res.statusCode !== 200) reject(new Error(`${res.statusCode}: ${body.error.message}`));
        else resolve(body); // {name, version, value, meta, lease_id, expires_at}
      });
    });
    req.on("error", reject);
    req.end();
  });
}

fetchSecret(process.argv[2], process.argv[3]).then(
  (s) => process.stdout.write(`${s.version} ${s.expires_at}\n${s.value}`),
  (e) => { console.error(e.message); process.exit(1); }
);
