//! `pagehint-uffd`: a Firecracker-compatible userfaultfd page-fault handler that loads guest
//! memory with pagehint's scheduler. A thin shell: cli → options → run → export.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Parser;
use pagehint_migrate::sys::hugepages::HugePages;
use pagehint_uffd::cli::{Action, Cli, ServeOptions, SourceSpec};
use pagehint_uffd::compare::{compare, table};
use pagehint_uffd::export::svg;
use pagehint_uffd::handler::{handle_connection, Control};
use pagehint_uffd::remote::{serve_memory, RemoteSource};
use pagehint_uffd::source::{FileSource, PageSource};
use pagehint_uffd::vmm::{restore, take_snapshot, RestoreOptions, Snapshot};

fn main() -> ExitCode {
    let action = match Cli::parse().action() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(action) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(o: ServeOptions) -> Result<(), String> {
    let src: Box<dyn PageSource> = match &o.source {
        SourceSpec::File(p) => {
            Box::new(FileSource::open(p).map_err(|e| format!("{}: {e}", p.display()))?)
        }
        // One connection per prefetcher and one for the fault thread, so that a fault's
        // fetch never waits behind a prefetch.
        SourceSpec::Remote { addr, timeout } => Box::new(
            RemoteSource::connect(addr.as_str(), o.handler.prefetchers + 1, *timeout)
                .map_err(|e| e.to_string())?,
        ),
    };
    let _ = std::fs::remove_file(&o.socket);
    let listener =
        UnixListener::bind(&o.socket).map_err(|e| format!("{}: {e}", o.socket.display()))?;
    eprintln!(
        "pagehint-uffd: policy {}, {} prefetcher(s), listening on {}",
        o.handler.policy,
        o.handler.prefetchers,
        o.socket.display()
    );
    let (conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let report = handle_connection(&conn, &*src, &o.handler, &Control::default());
    let _ = std::fs::remove_file(&o.socket);
    let report = report.map_err(|e| e.to_string())?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    match o.json {
        Some(p) => std::fs::write(&p, json).map_err(|e| format!("{}: {e}", p.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

fn mem_server(listen: &str, mem_file: &Path, idle: Duration) -> Result<(), String> {
    let src = FileSource::open(mem_file).map_err(|e| format!("{}: {e}", mem_file.display()))?;
    let listener = TcpListener::bind(listen).map_err(|e| format!("{listen}: {e}"))?;
    eprintln!(
        "pagehint-uffd mem-server: {} ({} bytes) on {}",
        mem_file.display(),
        src.size().unwrap_or(0),
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let stop = AtomicBool::new(false); // runs until the process is interrupted
    let st = serve_memory(&listener, &src, &stop, idle).map_err(|e| e.to_string())?;
    eprintln!("{st:?}");
    Ok(())
}

fn run(action: Action) -> Result<(), String> {
    match action {
        Action::Serve(o) => serve(o),
        Action::MemServer {
            listen,
            mem_file,
            idle,
        } => mem_server(&listen, &mem_file, idle),
        Action::Snapshot {
            dir,
            mem,
            vcpus,
            workload,
            host_page,
            warm,
        } => {
            let s = take_snapshot(&dir, mem, host_page, vcpus, workload, 7, warm)?;
            println!(
                "snapshot of {} ({} bytes, {} vCPUs) in {}",
                s.workload,
                mem,
                vcpus,
                dir.display()
            );
            Ok(())
        }
        Action::Restore {
            dir,
            socket,
            run_for,
        } => {
            let snap = Snapshot::load(&dir)?;
            let huge = snap.layout.host_page().bytes() > 4096;
            let _h = if huge {
                Some(HugePages::reserve(snap.layout.host_pages())?)
            } else {
                None
            };
            let out = restore(
                &snap,
                &RestoreOptions {
                    socket,
                    hugetlb: huge,
                    run_for,
                    linger: std::time::Duration::ZERO,
                },
                &|| true,
            )?;
            println!(
                "{}",
                serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
            );
            if out.errors > 0 {
                return Err(format!("the guest found {} bad pages", out.errors));
            }
            Ok(())
        }
        Action::Compare(o, json, svg_path) => {
            let _h = if o.host_page.bytes() > 4096 {
                Some(HugePages::reserve(o.mem / o.host_page.bytes() + 8)?)
            } else {
                None
            };
            let c = compare(&o, &|r| {
                eprintln!(
                    "{} / {} / run {}: blocktime {:.2} ms, {} faults",
                    r.workload,
                    r.policy,
                    r.repetition + 1,
                    r.blocktime_total_ms,
                    r.faults
                )
            })?;
            print!("{}", table(&c));
            if let Some(p) = json {
                let j = serde_json::to_string_pretty(&c).map_err(|e| e.to_string())?;
                std::fs::write(&p, j).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            if let Some(p) = svg_path {
                std::fs::write(&p, svg(&c)).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            if c.rows.iter().any(|r| r.guest_errors > 0 || r.eexist > 0) {
                return Err("a restore had guest check errors or pages placed twice".into());
            }
            Ok(())
        }
    }
}
