"""The tests' broker helpers: the real Mosquitto launcher (from ``fleet.mosquitto``) and a
scripted peer, :class:`Mqtt311OnlyProxy`, that answers MQTT 5 CONNECTs the way a 3.1.1-only
broker (amqtt) does and relays everything else to a real broker, to test
protocol fallback on a real socket.
"""

from __future__ import annotations

import socket
import threading

from fleet.mosquitto import HOST, MosquittoBroker, find_mosquitto, free_port, write_password_file

__all__ = ["MosquittoBroker", "find_mosquitto", "free_port", "write_password_file", "Mqtt311OnlyProxy"]


class Mqtt311OnlyProxy:
    """Relays TCP to ``upstream`` except MQTT 5 CONNECTs, which (``silent=False``) get a 3.1.1
    CONNACK "unacceptable protocol version" and a closed socket, or (``silent=True``) no
    answer at all — the two things amqtt does, depending on the CONNECT's properties."""

    def __init__(self, upstream: tuple[str, int], *, silent: bool = False) -> None:
        self.upstream = upstream
        self.silent = silent
        self.refused = 0
        self._srv = socket.create_server((HOST, 0))
        self.host, self.port = HOST, int(self._srv.getsockname()[1])
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="mqtt311-proxy").start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            first = client.recv(65536)
            if self._protocol_level(first) == 5:
                self.refused += 1
                if self.silent:
                    client.recv(1)  # hold the socket open, answer nothing, until the client hangs up
                else:
                    client.sendall(b"\x20\x02\x00\x01")
                return
            with socket.create_connection(self.upstream) as up:
                up.sendall(first)
                pump = threading.Thread(target=self._pipe, args=(up, client), daemon=True)
                pump.start()
                self._pipe(client, up)
                pump.join(5)

    @staticmethod
    def _protocol_level(packet: bytes) -> int | None:
        """CONNECT = 0x10, remaining length (1-4 byte varint), "\\0\\4MQTT", protocol level."""
        if len(packet) < 2 or packet[0] != 0x10:
            return None
        i = 1
        while i < 5 and i < len(packet) and packet[i] & 0x80:
            i += 1
        head = packet[i + 1:i + 8]
        return head[6] if len(head) == 7 and head[:6] == b"\x00\x04MQTT" else None

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._srv.close()
