// Compiles proto/ with a vendored protoc so a fresh machine needs no install.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Two compilations, so the descriptor set the public port's reflection
    // serves holds the public API only, never the node-to-node one.
    // The public API decodes with `codec::StrictCodec` (a malformed body is
    // INVALID_ARGUMENT); node-to-node traffic with prost's own.
    for (proto, descriptors, codec) in [
        ("sovra/v1/sovra.proto", "sovra_descriptor.bin", "crate::codec::StrictCodec"),
        ("sovra/raft/v1/raft.proto", "raft_descriptor.bin", "tonic_prost::ProstCodec"),
    ] {
        let proto = root.join(proto);
        let mut config = prost_build::Config::new();
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
        tonic_prost_build::configure()
            .codec_path(codec)
            .file_descriptor_set_path(out.join(descriptors))
            .compile_with_config(config, std::slice::from_ref(&proto), std::slice::from_ref(&root))?;
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    Ok(())
}
