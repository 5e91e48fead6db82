"""TLS: the server's SSLContext from the settings, and what the log says of TLS."""

import ssl

import gevent.ssl

from gcmd.config import Config, SettingError
from gcmd.net import wire

#: the values of --tls-min-version
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def tls_context(config: Config) -> ssl.SSLContext:
    """gevent's (cooperative) server side of TLS: the standard library's defaults (ciphers,
    options), --tls-min-version or later, with --tls-client-ca a client certificate
    required. SettingError names the file that cannot be used, and why."""
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[config.tls_min_version]
    # OpenSSL 3 refuses a client's TLS 1.2 renegotiation, older versions do not: a client
    # could make the server do a handshake's work on demand
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise SettingError("tls_cert", f"cannot use --tls-cert {config.tls_cert} "
                                       f"with --tls-key {config.tls_key}: {exc}") from None
    if config.tls_client_ca is not None:
        try:
            context.load_verify_locations(config.tls_client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise SettingError("tls_client_ca", f"cannot use --tls-client-ca "
                                                f"{config.tls_client_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_mode(config: Config) -> str:
    """The start-up line's `` (TLS 1.2+, server certificate only)``,
    `` (TLS 1.3+, client certificates required)``, or "" without TLS."""
    if not config.tls:
        return ""
    who = "client certificates required" if config.tls_client_ca else "server certificate only"
    return f" (TLS {config.tls_min_version}+, {who})"


def handshake_failure(exc: ssl.SSLError) -> str:
    """Why the handshake of a client that had to show a certificate failed, for the log."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not accepted: {exc.verify_message}"
    if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no client certificate"
    return f"TLS error: {exc.reason or exc}"


def common_name(certificate: dict) -> str:
    """The CN of a certificate's subject (``getpeercert()``'s dict), escaped for the log; "" if none."""
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return wire.escape(value.encode(errors="replace"))
    return ""
