"""A minimal HTTP/2 client over one TLS connection, read by the caller's one loop (h2, no threads).

httpx's HTTP/2 client shares a connection between threads through locks: 20 streams read from 20
threads took 6 to 16 s to open, and on a loaded box the connection was seen to fail. One reader
that drains every frame as it comes has no such ordering to wait on.
"""
from __future__ import annotations

import select
import socket
import ssl
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings

# Far above what the tests send, so no stream ever waits on a window update from us.
WINDOW = 16 * 1024 * 1024


@dataclass
class Http2Response:
    """What came back on one stream so far."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None

    def event_ids(self) -> list[int]:
        """The `id:` fields of the SSE events in the body so far, whole events only (ended by a blank line)."""
        whole = bytes(self.body).rpartition(b"\n\n")[0].decode()
        return [int(line[4:]) for line in whole.split("\n") if line.startswith("id: ")]


class Http2Connection:
    """One HTTP/2 connection (ALPN h2) to 127.0.0.1:`port`; `pump` reads what arrived."""

    def __init__(self, port: int, context: ssl.SSLContext, authority: str, headers: dict[str, str]):
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.protocol = self.sock.selected_alpn_protocol()
        self.sock.setblocking(False)
        self.authority, self.headers = authority, headers
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        # Sent as a SETTINGS frame (assigning local_settings would only queue it, never send it);
        # the connection's own window is raised apart, by a WINDOW_UPDATE.
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        self.h2.increment_flow_control_window(WINDOW - 65535)
        self.responses: dict[int, Http2Response] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self._flush()

    def request(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> int:
        """Send one request; its stream id, to find its response in `responses`."""
        stream_id = self.h2.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "https"), (":authority", self.authority), (":path", path),
                   *self.headers.items()]
        if content_type:
            headers.append(("content-type", content_type))
        self.h2.send_headers(stream_id, headers, end_stream=not body)
        if len(body) > self.h2.local_flow_control_window(stream_id):
            raise ValueError("a body over the server's flow-control window: not needed by the tests, so not written")
        step = self.h2.max_outbound_frame_size
        for start in range(0, len(body), step):
            self.h2.send_data(stream_id, body[start:start + step], end_stream=start + step >= len(body))
        self.responses[stream_id] = Http2Response()
        self._flush()
        return stream_id

    def pump(self, timeout: float) -> None:
        """Read and handle whatever arrives within `timeout` seconds (returns after the first read)."""
        if self.terminated is not None:
            raise ConnectionError(f"the server ended the connection: {self.terminated}")
        # Bytes TLS has decrypted already are not the socket's to signal: look at them first.
        if not self.sock.pending() and not select.select([self.sock], [], [], timeout)[0]:
            return
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        if not data:
            raise ConnectionError("the server closed the connection")
        for event in self.h2.receive_data(data):
            self._handle(event)
        self._flush()

    def until(self, check, timeout: float, what: str):
        """Pump until `check()` is truthy; its value. TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not (value := check()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            self.pump(0.05)
        return value

    def close(self) -> None:
        """GOAWAY, then close the socket."""
        try:
            self.h2.close_connection()
            self._flush()
        except OSError:
            pass
        self.sock.close()

    def _handle(self, event: h2.events.Event) -> None:
        """Record one h2 event on its stream's response."""
        if isinstance(event, h2.events.ResponseReceived):
            response = self.responses[event.stream_id]
            response.headers = dict(event.headers)
            response.status = int(response.headers[":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.responses[event.stream_id].body += event.data
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.responses[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.responses[event.stream_id].reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event

    def _flush(self) -> None:
        """Send what h2 has queued (blocking until the kernel takes it)."""
        data = self.h2.data_to_send()
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)
