//! TLS settings shared by implicit TLS (our own rustls handshake) and STARTTLS (lettre's).

use std::{fmt, io, net::SocketAddr, pin::Pin, sync::Arc, task};

use lettre::transport::smtp::client::{AsyncTokioStream, Certificate, TlsParameters};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{
    client::TlsStream,
    rustls::{
        self,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
        ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    },
    TlsConnector,
};

/// Which certificates to trust for one server.
#[derive(Clone, Default)]
pub struct TrustSettings {
    /// Extra CA certificates, PEM (the profile's and the operator's).
    pub extra_roots_pem: Vec<String>,
    /// Verify the certificate chain and the host name.
    pub verify: bool,
}

impl fmt::Debug for TrustSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustSettings")
            .field("extra_roots", &self.extra_roots_pem.len())
            .field("verify", &self.verify)
            .finish()
    }
}

/// Why TLS could not be set up before the handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A trusted CA certificate is not valid PEM.
    #[error("trusted CA certificate is not a valid PEM certificate")]
    BadCertificate,
    /// The host is not a valid TLS server name.
    #[error("host is not a valid TLS server name")]
    BadServerName,
    /// lettre refused the parameters.
    #[error("TLS parameters: {0}")]
    Lettre(String),
}

impl TrustSettings {
    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
        let mut out = Vec::new();
        for pem in &self.extra_roots_pem {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                out.push(cert.map_err(|_| TlsSetupError::BadCertificate)?);
            }
        }
        Ok(out)
    }

    /// A rustls client configuration for implicit TLS.
    pub fn rustls_config(&self) -> Result<Arc<ClientConfig>, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::Lettre(e.to_string()))?;
        let config = if self.verify {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            for cert in self.certificates()? {
                roots.add(cert).map_err(|_| TlsSetupError::BadCertificate)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth()
        };
        Ok(Arc::new(config))
    }

    /// lettre's parameters for STARTTLS to `host`.
    pub fn lettre_parameters(&self, host: &str) -> Result<TlsParameters, TlsSetupError> {
        let mut builder = TlsParameters::builder(host.to_owned());
        for pem in &self.extra_roots_pem {
            let cert =
                Certificate::from_pem(pem.as_bytes()).map_err(|_| TlsSetupError::BadCertificate)?;
            builder = builder.add_root_certificate(cert);
        }
        if !self.verify {
            builder = builder
                .dangerous_accept_invalid_certs(true)
                .dangerous_accept_invalid_hostnames(true);
        }
        builder
            .build_rustls()
            .map_err(|e| TlsSetupError::Lettre(e.to_string()))
    }
}

/// Performs the implicit-TLS handshake on a connected socket.
pub(super) async fn handshake(
    tcp: TcpStream,
    host: &str,
    trust: &TrustSettings,
) -> Result<TlsSocket, HandshakeError> {
    let config = trust.rustls_config().map_err(HandshakeError::Setup)?;
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| HandshakeError::Setup(TlsSetupError::BadServerName))?;
    let peer = tcp.peer_addr().map_err(HandshakeError::Io)?;
    let stream = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(HandshakeError::Io)?;
    Ok(TlsSocket { stream, peer })
}

/// Why an implicit-TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The configuration could not be built.
    #[error(transparent)]
    Setup(TlsSetupError),
    /// The handshake failed (certificate, protocol or network).
    #[error("TLS handshake failed: {0}")]
    Io(#[source] io::Error),
}

/// A TLS stream that lettre can drive.
#[derive(Debug)]
pub(super) struct TlsSocket {
    stream: TlsStream<TcpStream>,
    peer: SocketAddr,
}

impl AsyncTokioStream for TlsSocket {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}

impl AsyncRead for TlsSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> task::Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &[u8],
    ) -> task::Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> task::Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> task::Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Verification off (only where the operator allows it): accepts any certificate but still
/// checks the handshake signatures.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
