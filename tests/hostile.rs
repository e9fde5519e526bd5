//! Every public call, fed random and truncated bodies over a real channel by
//! a caller holding the admin key (so each body gets past authentication to
//! decoding and validation): each answer is a gRPC status the server chose
//! (INVALID_ARGUMENT for a body that does not decode, never INTERNAL), never a
//! dropped connection, and the node stays up, SERVING, and answers
//! well-formed calls the same as before. The bodies are seeded: a failure prints the seed.

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sovra_proto::v1;
use sovra_tests::*;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;

/// Passes bytes through as they are: the body is whatever the test made.
#[derive(Default, Clone)]
struct Raw;
struct RawEncoder;
struct RawDecoder;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Every method of package `sovra.v1`: (path, server-streaming).
fn public_methods() -> Vec<(String, bool)> {
    let set = prost_types::FileDescriptorSet::decode(sovra_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for f in set.file.iter().filter(|f| f.package() == "sovra.v1") {
        for s in &f.service {
            for m in &s.method {
                out.push((format!("/sovra.v1.{}/{}", s.name(), m.name()), m.server_streaming()));
            }
        }
    }
    out
}

/// Protobuf-shaped noise: fields with random numbers and wire types, some
/// lengths longer than what follows, nested garbage; then cut at a random
/// point half the time.
fn noise(rng: &mut StdRng, depth: u32) -> Vec<u8> {
    let mut b = Vec::new();
    for _ in 0..rng.random_range(1..12) {
        let field: u32 = rng.random_range(1..20);
        match rng.random_range(0..if depth < 3 { 5 } else { 3 }) {
            0 => {
                prost::encoding::encode_key(field, prost::encoding::WireType::Varint, &mut b);
                prost::encoding::encode_varint(rng.random::<u64>() >> rng.random_range(0..64), &mut b);
            }
            1 => {
                prost::encoding::encode_key(field, prost::encoding::WireType::ThirtyTwoBit, &mut b);
                b.extend_from_slice(&rng.random::<[u8; 4]>());
            }
            2 => {
                let body: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
                prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut b);
                // Sometimes a length that promises more than follows.
                let len = body.len() as u64 + if rng.random_bool(0.2) { rng.random_range(1..1_000_000) } else { 0 };
                prost::encoding::encode_varint(len, &mut b);
                b.extend_from_slice(&body);
            }
            4 => {
                // A nested message of noise (repeated points, filters, ...).
                let inner = noise(rng, depth + 1);
                prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut b);
                prost::encoding::encode_varint(inner.len() as u64, &mut b);
                b.extend_from_slice(&inner);
            }
            _ => b.extend((0..rng.random_range(1..16)).map(|_| rng.random::<u8>())),
        }
    }
    if rng.random_bool(0.5) && !b.is_empty() {
        b.truncate(rng.random_range(0..b.len()));
    }
    b
}

/// Sends `body` to `path`; the status, or OK (a streaming call: its first item
/// or end).
async fn send(channel: &tonic::transport::Channel, key: &str, path: &str, streaming: bool, body: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(body);
    req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    req.set_timeout(std::time::Duration::from_secs(10));
    let path = http::uri::PathAndQuery::try_from(path).unwrap();
    if streaming {
        let mut s = grpc.server_streaming(req, path, Raw).await?.into_inner();
        s.message().await?;
    } else {
        grpc.unary(req, path, Raw).await?;
    }
    Ok(())
}

/// A status the client made up because the connection or stream broke, as
/// opposed to one the server answered with.
fn transport_failed(s: &tonic::Status) -> bool {
    use std::error::Error;
    let m = s.message();
    s.source().is_some() || m.contains("transport error") || m.contains("h2 protocol error") || m.contains("connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_truncated_bodies_on_every_public_call_get_a_status_and_the_node_stays_up() {
    let seed: u64 = std::env::var("SOVRA_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(11);
    eprintln!("seed {seed}; reproduce with SOVRA_FUZZ_SEED={seed} cargo nextest run -p sovra-tests --test hostile");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = TestNode::start("uk").await;
    n.collections
        .create_collection(v1::CreateCollectionRequest {
            collection: Some(spec("people", 4, v1::Metric::L2, "uk")),
        })
        .await
        .unwrap();
    n.points
        .upsert(v1::UpsertRequest {
            collection: "people".into(),
            points: (0..20).map(|i| point(i, vec![i as f32, 0.0, 0.0, 1.0], "uk")).collect(),
        })
        .await
        .unwrap();
    let query = v1::SearchRequest {
        collection: "people".into(),
        vector: vec![3.0, 0.0, 0.0, 1.0],
        k: 5,
        ..Default::default()
    };
    let before = ids_of(&n.search.search(query.clone()).await.unwrap().into_inner());

    let methods = public_methods();
    assert!(methods.len() >= 30, "only {} public methods found", methods.len());
    let mut codes: std::collections::BTreeMap<String, usize> = Default::default();
    for (path, streaming) in &methods {
        // The empty body is a valid (all-default) message: it too must be
        // refused or answered, never crash anything.
        let mut bodies = vec![Vec::new()];
        bodies.extend((0..24).map(|_| noise(&mut rng, 0)));
        for body in bodies {
            let shown = hex::encode(&body[..body.len().min(64)]);
            let code = match send(&n.channel, &n.key, path, *streaming, body).await {
                Ok(()) => Code::Ok,
                Err(s) => {
                    // A status the server chose, with a message; never the
                    // transport giving up (a crashed handler or a reset).
                    // INTERNAL would blame the server for the caller's bytes.
                    assert!(
                        !matches!(s.code(), Code::Unknown | Code::Cancelled | Code::Internal) && !transport_failed(&s),
                        "{path} with body {shown}: {s:?} (seed {seed})"
                    );
                    assert!(
                        !s.message().is_empty(),
                        "{path} with body {shown}: a status without a message (seed {seed})"
                    );
                    s.code()
                }
            };
            *codes.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    eprintln!("answers by code: {codes:?}");
    assert!(codes.get("InvalidArgument").copied().unwrap_or(0) > methods.len(), "{codes:?}");

    // Up, SERVING, and the data as it was (no call above was a valid delete
    // of these points: noise cannot name the collection "people").
    let mut health = tonic_health::pb::health_client::HealthClient::new(n.channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let after = ids_of(&n.search.search(query).await.unwrap().into_inner());
    assert_eq!(before, after);
}
