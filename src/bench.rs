//! placeholder
use clap::Args;
/// Benchmark settings.
#[derive(Args, Debug)]
pub struct BenchArgs {}
/// Runs the benchmark.
pub async fn run(_args: BenchArgs) -> anyhow::Result<()> { Ok(()) }
