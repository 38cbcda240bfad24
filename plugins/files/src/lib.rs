//! The files plugin: real work on real files.
//!
//! Every method takes `{"path": "..."}`. A path that does not exist, is a
//! directory or cannot be read fails the job for good, with the path in the
//! message, because another attempt would meet the same file.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use jobhost_plugin_api::{JobContext, JobError, export_jobs};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct FileParams {
    path: PathBuf,
}

#[derive(Serialize)]
struct Checksum {
    path: PathBuf,
    sha256: String,
    bytes: u64,
}

#[derive(Serialize)]
struct Compressed {
    path: PathBuf,
    gzip_path: PathBuf,
    original_bytes: u64,
    compressed_bytes: u64,
}

/// Returns the SHA-256 digest of a file, in lowercase hex.
fn sha256(ctx: &JobContext, params: FileParams) -> Result<Checksum, JobError> {
    let (file, size) = open_regular_file(&params.path)?;
    let mut hasher = Sha256::new();
    let bytes = copy_with_progress(ctx, file, size, &mut HashWriter(&mut hasher))
        .map_err(|error| read_error(&params.path, error))?;
    let sha256 = hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
    ctx.log(format!("sha256 of {} is {sha256}", params.path.display()));
    Ok(Checksum { path: params.path, sha256, bytes })
}

/// Compresses a file into `PATH.gz` beside it and returns both sizes.
fn gzip(ctx: &JobContext, params: FileParams) -> Result<Compressed, JobError> {
    let (file, size) = open_regular_file(&params.path)?;
    let mut gzip_path = params.path.clone().into_os_string();
    gzip_path.push(".gz");
    let gzip_path = PathBuf::from(gzip_path);

    let output = File::create(&gzip_path).map_err(|error| write_error(&gzip_path, error))?;
    let mut encoder = GzEncoder::new(BufWriter::new(output), Compression::default());
    let original_bytes = copy_with_progress(ctx, file, size, &mut encoder).map_err(|error| read_error(&params.path, error))?;
    let mut output = encoder.finish().map_err(|error| write_error(&gzip_path, error))?;
    output.flush().map_err(|error| write_error(&gzip_path, error))?;
    drop(output);

    let compressed_bytes = std::fs::metadata(&gzip_path).map_err(|error| write_error(&gzip_path, error))?.len();
    ctx.log(format!("compressed {} ({original_bytes} bytes) into {} ({compressed_bytes} bytes)", params.path.display(), gzip_path.display()));
    Ok(Compressed { path: params.path, gzip_path, original_bytes, compressed_bytes })
}

/// Opens `path` for reading, failing for good unless it is a readable regular file.
fn open_regular_file(path: &Path) -> Result<(BufReader<File>, u64), JobError> {
    let metadata = std::fs::metadata(path).map_err(|error| read_error(path, error))?;
    if metadata.is_dir() {
        return Err(JobError::fatal(format!("{} is a directory, not a file", path.display())));
    }
    let file = File::open(path).map_err(|error| read_error(path, error))?;
    Ok((BufReader::new(file), metadata.len()))
}

/// Copies `reader` into `writer`, reporting progress against `size` bytes.
fn copy_with_progress(ctx: &JobContext, mut reader: impl Read, size: u64, writer: &mut impl Write) -> io::Result<u64> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        writer.write_all(&buffer[..read])?;
        copied += read as u64;
        if size > 0 {
            ctx.progress(copied as f64 / size as f64);
        }
    }
    Ok(copied)
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        self.0.update(buffer);
        Ok(buffer.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn read_error(path: &Path, error: io::Error) -> JobError {
    let message = match error.kind() {
        ErrorKind::NotFound => format!("{} does not exist", path.display()),
        ErrorKind::PermissionDenied => format!("cannot read {}: permission denied", path.display()),
        _ => format!("cannot read {}: {error}", path.display()),
    };
    JobError::fatal(message)
}

fn write_error(path: &Path, error: io::Error) -> JobError {
    let message = format!("cannot write {}: {error}", path.display());
    // A full disk or a quota may clear up; a missing directory or a denied
    // permission will not.
    match error.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::Interrupted | ErrorKind::TimedOut => {
            JobError::retry(message)
        }
        _ => JobError::fatal(message),
    }
}

export_jobs! {
    name: "files",
    methods: [sha256, gzip],
}
