//! The embedded system default service: each email is written as an `.eml` file.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

/// Writes emails under a directory, one file per message, durably.
#[derive(Debug, Clone)]
pub struct FileDrop {
    dir: PathBuf,
}

impl FileDrop {
    /// A file drop under `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `<dir>/<tenant>/<message id>.eml` (atomically: temp file, fsync, rename), with
    /// the envelope in `X-Mailgate-Envelope-*` lines before the message.
    pub async fn write(
        &self,
        tenant_id: &str,
        message_id: &str,
        envelope_from: &str,
        recipients: &[String],
        body: &[u8],
    ) -> std::io::Result<PathBuf> {
        let dir = self.dir.join(sanitize(tenant_id));
        tokio::fs::create_dir_all(&dir).await?;
        let path = dir.join(format!("{}.eml", sanitize(message_id)));
        let tmp = dir.join(format!(".{}.tmp", sanitize(message_id)));
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut head = format!("X-Mailgate-Envelope-From: {envelope_from}\r\n");
        for r in recipients {
            head.push_str(&format!("X-Mailgate-Envelope-To: {r}\r\n"));
        }
        file.write_all(head.as_bytes()).await?;
        file.write_all(body).await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&tmp, &path).await?;
        Ok(path)
    }
}

/// Keeps ids safe as file names.
fn sanitize(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
