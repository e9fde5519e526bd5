//! The `sovra` binary: `sovra node`, `sovra dev`, `sovra bench index|replication|search|replicas|cluster|startup`
//! and the rest of [`sovra_node::cli`].

fn main() -> anyhow::Result<()> {
    sovra_node::cli::main()
}
