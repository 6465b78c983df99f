//! The `kestrel` command line.

use clap::{Parser, Subcommand};
use kestrel::device::kernels;

#[derive(Parser)]
#[command(
    name = "kestrel",
    version,
    about = "CUDA-kernel-centric Faster R-CNN engine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List every kernel entry point, its file, and whether it is nvcc PTX or NVRTC source.
    Kernels,
    /// Say which devices are usable here.
    Devices,
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Kernels => {
            println!("{:<32} {:<22} code", "kernel", "file");
            for f in kernels::files() {
                for e in f.entries {
                    println!("{:<32} {:<22} {}", e, f.file, kernels::origin(f));
                }
            }
            Ok(())
        }
        Cmd::Devices => {
            println!("cpu: {} threads", rayon::current_num_threads());
            match kestrel::device::gpu::device(0) {
                Ok(d) => println!("cuda:0: {}", d.backend.name()),
                Err(e) => println!("cuda: {e}"),
            }
            Ok::<(), kestrel::Error>(())
        }
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
