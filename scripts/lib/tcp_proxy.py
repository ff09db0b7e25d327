"""A TCP proxy on 127.0.0.1 that a fault driver can pause, cut and resume: one
replica's path to Redis or to PostgreSQL, in the spirit of toxiproxy (and of the test
harness's tests/api/support/proxy.rs).

- pause: connections stay open, no byte moves either way (a stalled network path or a
  frozen peer: the replica sees silence, not an error);
- cut: every open connection is closed, and new ones are closed at once (a route that
  disappeared, a firewall resetting connections);
- resume: bytes flow again, held ones first.

Standard library only; two threads per proxied connection.
"""

import socket
import threading

OPEN, PAUSED, CUT = "open", "paused", "cut"


class Proxy:
    def __init__(self, upstream_port, name="proxy"):
        self.name = name
        self.upstream_port = upstream_port
        self.mode = OPEN
        self.cond = threading.Condition()
        self.conns = set()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name=name + "-accept").start()

    # -- control ------------------------------------------------------------------------

    def pause(self):
        self._set(PAUSED)

    def resume(self):
        self._set(OPEN)

    def cut(self):
        self._set(CUT)
        with self.cond:
            conns = list(self.conns)
        for conn in conns:
            _close(conn)

    def close(self):
        self.closed = True
        self.cut()
        _close(self.listener)

    def _set(self, mode):
        with self.cond:
            self.mode = mode
            self.cond.notify_all()

    # -- forwarding ---------------------------------------------------------------------

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.cond:
                mode = self.mode
            if mode == CUT:
                _close(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.cond:
                self.conns.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True,
                                 name=self.name + "-pump").start()

    def _flowing(self):
        """Waits while paused; False once cut."""
        with self.cond:
            while self.mode == PAUSED:
                self.cond.wait()
            return self.mode == OPEN

    def _pump(self, src, dst):
        try:
            while True:
                if not self._flowing():
                    break
                data = src.recv(65536)
                if not data:
                    break
                # Bytes read just before a pause are held until the path opens again.
                if not self._flowing():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)
            with self.cond:
                self.conns.discard(src)
                self.conns.discard(dst)


def _close(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
