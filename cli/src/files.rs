//! Files holding credentials or keys: written atomically (a temporary file in the same
//! directory, renamed over the target) and readable by their owner only.

use std::io::Write;
use std::path::Path;

use crate::error::{CliError, Kind, Result};

/// Writes `contents` to `path` with mode `0600`, replacing what was there.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let failed = |error: std::io::Error| {
        CliError::new(
            Kind::Failed,
            format!("cannot write {}: {error}", path.display()),
        )
    };
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    // tempfile creates the file with mode 0600 before anything is written to it.
    let mut file = tempfile::Builder::new()
        .prefix(".gefyra-")
        .tempfile_in(directory)
        .map_err(failed)?;
    file.write_all(contents).map_err(failed)?;
    file.as_file().sync_all().map_err(failed)?;
    file.persist(path).map_err(|error| failed(error.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn written_0600_and_replaced_whole() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("client.json");
        std::fs::write(&path, "an older, longer, world-readable file").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"{}").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(directory.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
        let error = write_private(&directory.path().join("missing/dir/file"), b"x").unwrap_err();
        assert!(error.message.contains("cannot write"), "{}", error.message);
    }
}
