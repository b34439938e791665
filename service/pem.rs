//! PEM certificate files, read the one way every TLS setting needs them: a
//! bundle that holds at least one certificate, or an error that says which
//! it is not (never quoting the file). The caller names the setting.

use anyhow::{anyhow, bail};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject as _},
};

/// The certificates of a PEM file, in order; an error if it holds none.
pub(crate) fn certificates(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("not PEM certificates ({e})"))?;
    if certs.is_empty() {
        bail!("no certificate in the file");
    }
    Ok(certs)
}

/// The CAs of a PEM bundle, as trust roots.
pub(crate) fn roots(pem: &[u8]) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in certificates(pem)? {
        roots
            .add(ca)
            .map_err(|e| anyhow!("a certificate is not a usable CA ({e})"))?;
    }
    Ok(roots)
}
