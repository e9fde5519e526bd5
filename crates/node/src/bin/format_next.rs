//! TEST ONLY: `sovra` writing the next data directory format, which upgrades
//! a directory of the current one in place as a real format change would.
//! deploy/test-compose replaces every node with it, one at a time: a rolling
//! upgrade to a build whose format is one higher. Never ship it: a directory
//! it has opened cannot be read by `sovra` again.

fn main() -> anyhow::Result<()> {
    sovra_node::state::use_next_format();
    sovra_node::cli::main()
}
