//! The PC's own WireGuard private key (`airlock flash --wireguard-key`):
//! the format `wg genkey` writes (32 bytes, standard base64, one line), and
//! its public half, which IT adds to the tunnel server's peer list.

use anyhow::{bail, Result};
use base64::Engine as _;

/// A checked private key.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never in a log or a panic message.
        f.write_str("PrivateKey(…)")
    }
}

impl PrivateKey {
    /// Parses the text of a key file: one line of 44 base64 characters
    /// (a final newline allowed), 32 bytes, not all zero.
    pub fn parse(text: &[u8]) -> Result<PrivateKey> {
        let text = std::str::from_utf8(text).map_err(|_| anyhow::anyhow!("not text"))?;
        let line = text.strip_suffix('\n').unwrap_or(text);
        if line.contains(['\n', '\r']) || line.trim() != line {
            bail!("expected one line holding the key alone, as `wg genkey` writes it");
        }
        if line.len() != 44 {
            bail!("{} characters; a WireGuard key is 44 characters of base64 (make one with `wg genkey`)", line.len());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(line)
            .map_err(|e| anyhow::anyhow!("not base64 ({e}); make a key with `wg genkey`"))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("not 32 bytes"))?;
        if key == [0; 32] {
            bail!("the key is all zeros");
        }
        Ok(PrivateKey(key))
    }

    /// The key file's text as written onto the PC (the format `wg` reads).
    pub fn file_text(&self) -> String {
        format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }

    /// The public key, as `wg pubkey` prints it: X25519 of the clamped key
    /// with the base point.
    pub fn public(&self) -> String {
        let point = curve25519_dalek::MontgomeryPoint::mul_base_clamped(self.0);
        base64::engine::general_purpose::STANDARD.encode(point.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7748 §6.1 (X25519 Diffie-Hellman): Alice's private key and the
    /// public key it gives.
    #[test]
    fn public_key_is_x25519_of_the_private_one() {
        let private =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        let public =
            hex::decode("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
                .unwrap();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let key = PrivateKey::parse(format!("{}\n", b64(&private)).as_bytes()).unwrap();
        assert_eq!(key.public(), b64(&public));
        assert_eq!(key.file_text(), format!("{}\n", b64(&private)));
        assert_eq!(format!("{key:?}"), "PrivateKey(…)");
    }

    #[test]
    fn what_is_not_a_key_is_refused_with_the_reason() {
        let good = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        assert!(PrivateKey::parse(good.as_bytes()).is_ok());
        for (text, why) in [
            ("", "0 characters"),
            (
                "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBm=",
                "43 characters",
            ),
            ("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBm!=", "not base64"),
            (
                "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\n",
                "one line",
            ),
            (" yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=", "one line"),
            ("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "all zeros"),
            ("-----BEGIN PRIVATE KEY-----", "characters"),
        ] {
            let e = PrivateKey::parse(text.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        assert!(PrivateKey::parse(&[0xff, 0xfe])
            .unwrap_err()
            .to_string()
            .contains("not text"));
    }
}
