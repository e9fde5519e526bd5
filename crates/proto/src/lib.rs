//! The wire layer: code generated from `proto/`, conversions between wire
//! messages and `sovra-types`, and the one mapping from [`ApiError`] codes to
//! gRPC statuses. Depends on `sovra-types` only; never on the engine.

pub mod codec;
pub mod convert;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sovra.v1");
}

/// Node-to-node messages (`proto/sovra/raft/v1`): Raft per group, and the
/// coordinators' leaf reads.
pub mod raft {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sovra.raft.v1");
}

/// For the public port's gRPC reflection service, so `grpcurl` works without
/// the protos. The public API (`sovra.v1`) only.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sovra_descriptor");

use sovra_types::{ApiError, ErrorCode};

pub fn status_of(e: &ApiError) -> tonic::Status {
    let code = match e.code {
        ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorCode::NotFound => tonic::Code::NotFound,
        ErrorCode::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorCode::Unavailable => tonic::Code::Unavailable,
        ErrorCode::Internal => tonic::Code::Internal,
        ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
    };
    let mut status = tonic::Status::new(code, e.message.clone());
    if let Some(ms) = e.retry_after_ms {
        status.metadata_mut().insert(RETRY_AFTER_HEADER, ms.into());
    }
    status
}

/// Milliseconds to wait before trying again, on a call refused by a rate.
pub const RETRY_AFTER_HEADER: &str = "retry-after-ms";
