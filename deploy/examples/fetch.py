"""Fetch a secret from keywarden's agent socket with Python's standard library only."""
import http.client
import json
import socket
import sys


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def fetch(socket_path, name, ttl=300):
    conn = UnixHTTPConnection(socket_path)
    conn.request("GET", f"/v1/secrets/{name}?ttl={ttl}")
    response = conn.getresponse()
    body = json.loads(response.read() or b"{}")
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {body['error']['message']}")
    return body  # {"name", "version", "value", "meta", "lease_id", "expires_at"}


if __name__ == "__main__":
    secret = fetch(sys.argv[1], sys.argv[2])
    print(secret["version"], secret["expires_at"])
    sys.stdout.write(secret["value"])
