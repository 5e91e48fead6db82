"""The network: the server (accept, admission, caps, shutdown), one client's
life (open, serve, farewell), the PROXY header, TLS and the wire format."""
