//! The object store named by `[tier] object_store`: a local directory (`file:///abs/dir`, the
//! embedded default `<data_dir>/bucket`) or S3 and its kin (`s3://bucket[/prefix]`, configured
//! by the usual `AWS_*` variables: `AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::{ObjectStore, RetryConfig};

/// A parsed `object_store` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local directory.
    File(PathBuf),
    /// An S3 bucket and key prefix (without slashes at either end; may be empty).
    S3 {
        /// Bucket.
        bucket: String,
        /// Key prefix.
        prefix: String,
    },
}

/// Parses `url`, naming what is wrong.
pub fn parse_url(url: &str) -> Result<StoreUrl, String> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(format!("{url:?}: a file URL needs an absolute path (file:///dir)"));
        }
        return Ok(StoreUrl::File(PathBuf::from(path)));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(ok) {
            return Err(format!("{url:?}: bucket {bucket:?} is not a valid S3 bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Err(format!("{url:?}: prefix {prefix:?} has an empty, '.' or '..' part"));
        }
        return Ok(StoreUrl::S3 { bucket: bucket.into(), prefix: prefix.into() });
    }
    Err(format!("{url:?}: expected file:///dir or s3://bucket[/prefix]"))
}

/// The store and the key prefix to write under.
pub fn open(url: Option<&str>, data_dir: &Path) -> Result<(Arc<dyn ObjectStore>, String), String> {
    let parsed = match url {
        Some(u) => parse_url(u)?,
        None => StoreUrl::File(data_dir.join("bucket")),
    };
    match parsed {
        StoreUrl::File(dir) => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("object store directory {}: {e}", dir.display()))?;
            let fs = LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| format!("object store directory {}: {e}", dir.display()))?;
            Ok((Arc::new(fs), String::new()))
        }
        StoreUrl::S3 { bucket, prefix } => {
            // The client's own retries stay short (3 tries within 15 s): the tierer retries
            // whole rounds with its own capped backoff and counts each failure, so an outage
            // shows in the metric instead of hiding in minutes of client retries.
            let retry =
                RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(15), ..RetryConfig::default() };
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(&bucket)
                .with_retry(retry)
                .build()
                .map_err(|e| format!("object store s3://{bucket}: {e}"))?;
            Ok((Arc::new(s3), prefix))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        assert_eq!(parse_url("file:///var/b").unwrap(), StoreUrl::File("/var/b".into()));
        assert_eq!(
            parse_url("s3://my-bucket/a/b/").unwrap(),
            StoreUrl::S3 { bucket: "my-bucket".into(), prefix: "a/b".into() }
        );
        assert_eq!(
            parse_url("s3://my-bucket").unwrap(),
            StoreUrl::S3 { bucket: "my-bucket".into(), prefix: "".into() }
        );
        assert!(parse_url("file://rel/dir").unwrap_err().contains("absolute"));
        assert!(parse_url("s3://B_ad").unwrap_err().contains("bucket"));
        assert!(parse_url("s3://ok-bucket/a/../b").unwrap_err().contains("prefix"));
        assert!(parse_url("gs://x").unwrap_err().contains("expected"));
    }
}
