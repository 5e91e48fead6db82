"""The TLS files of the settings: gevent's SSLContext for the server (at start-up and at
SIGHUP), and what the start-up line says of TLS."""

import ssl

import gevent.ssl

from gcmd.config import Config, SettingError

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
