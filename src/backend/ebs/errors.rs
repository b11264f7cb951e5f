//! How the ebs backend's failures become the backend layer's `BackendError`: an `EbsError` as itself,
//! anything unexpected as an internal error of the ebs backend, and blocking work run off the async
//! threads with its panics reported the same way. It must not define errors of its own (`EbsError`, in
//! `client`, is the module's one enum).

use super::client::EbsError;
use crate::backend::BackendError;
use crate::spec::BackendKind;

pub(super) fn ebs_err(e: EbsError) -> BackendError {
    BackendError::Ebs(Box::new(e))
}

pub(super) fn internal(e: impl std::fmt::Display) -> BackendError {
    BackendError::Internal(BackendKind::Ebs, e.to_string())
}

/// Runs blocking work (image I/O, mkfs, mount) off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    crate::backend::blocking(BackendKind::Ebs, f).await
}
