//! `privcomm-chat`: privcomm in a terminal, on the same client core as the
//! Android app. Try it in two terminals:
//!
//! ```sh
//! privcomm-chat --store alice.db register +15550001   # prints alice's user id
//! privcomm-chat --store bob.db register +15550002
//! privcomm-chat --store alice.db chat <bob's user id>  # type lines; bob's arrive live
//! privcomm-chat --store bob.db chat <alice's user id>
//! ```
//!
//! And a call (a terminal has no microphone: each side sends a tone and
//! prints the pitch it hears): `privcomm-chat --store bob.db answer`, then
//! `privcomm-chat --store alice.db call <bob's user id>`.
//!
//! The store key lives in `<store>.key` (32 random bytes, created with mode
//! 0600 on first use) unless `PRIVCOMM_STORE_KEY` (64 hex digits) is set.

use clap::{Parser, Subcommand};
use privcomm_client::call::media::{FRAME_SAMPLES, SAMPLE_RATE};
use privcomm_client::call::tone::{Tone, dominant, rms};
use privcomm_client::{
    CallInfo, CallListener, CallState, ChatMessage, Client, ClientConfig, ClientListener, ConnectionState,
};
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "privcomm-chat", version, about = "End-to-end-encrypted chat on privcomm, in a terminal")]
struct Cli {
    /// The encrypted local store (created if missing).
    #[arg(long, env = "PRIVCOMM_STORE", default_value = "privcomm-chat.db")]
    store: PathBuf,
    /// The server.
    #[arg(long, env = "PRIVCOMM_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an account (only the SHA-256 of the number leaves this machine).
    Register {
        /// Phone number.
        phone: String,
    },
    /// This account's user id.
    Whoami,
    /// The safety number to compare with a contact (read it to each other).
    SafetyNumber {
        /// The contact's user id.
        contact: String,
    },
    /// Send one message and wait until the server accepted it.
    Send {
        /// The contact's user id.
        to: String,
        /// The text.
        text: String,
    },
    /// Chat with a contact: lines you type are sent, messages arrive live.
    Chat {
        /// The contact's user id.
        contact: String,
    },
    /// Print messages as they arrive.
    Listen,
    /// The conversation so far (from the local store).
    History,
    /// Accept a contact's changed identity key (after comparing safety numbers).
    Trust {
        /// The contact's user id.
        contact: String,
    },
    /// Refill one-time prekeys and rotate the signed prekey when due.
    MaintainPrekeys,
    /// Call a contact: sends a tone, prints the pitch heard each second,
    /// hangs up after `--seconds` (or when the other side does).
    Call {
        /// The contact's user id.
        contact: String,
        /// The tone to send (Hz).
        #[arg(long, default_value_t = 440.0)]
        tone: f64,
        /// How long to stay in the call once connected.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Wait for a call and answer it: sends a tone and prints the pitch heard
    /// each second until the call ends.
    Answer {
        /// The tone to send (Hz).
        #[arg(long, default_value_t = 660.0)]
        tone: f64,
    },
    /// Benchmark: calls between two new accounts through the server
    /// (`--server`) — set-up time and PCM-to-PCM latency (docs/BENCHMARKS.md).
    BenchCalls {
        /// Calls set up.
        #[arg(long, default_value_t = 20)]
        calls: usize,
        /// Tone onsets timed on the last call.
        #[arg(long, default_value_t = 50)]
        onsets: usize,
        /// Where the benchmark's stores go (removed afterwards).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Both clients offer only a TURN relay (the server needs TURN_URLS).
        #[arg(long)]
        relay_only: bool,
    },
    /// Benchmark: encrypt+persist and decrypt+persist per message against
    /// raw libsignal with in-memory stores (no server; docs/BENCHMARKS.md).
    Bench {
        /// Messages A → B.
        #[arg(long, default_value_t = 5_000)]
        messages: usize,
        /// Messages per store commit (the connection commits what arrived
        /// together; 1 = one commit per message).
        #[arg(long, default_value_t = 100)]
        burst: usize,
        /// Where the benchmark's stores go (removed afterwards).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

struct Printer {
    sent: std::sync::mpsc::Sender<String>,
    connected: std::sync::mpsc::Sender<ConnectionState>,
}

impl ClientListener for Printer {
    fn on_state_changed(&self, state: ConnectionState, detail: String) {
        if !detail.is_empty() || state == ConnectionState::Error {
            eprintln!("[{state:?}] {detail}");
        }
        let _ = self.connected.send(state);
    }
    fn on_message(&self, message: ChatMessage) {
        println!("{} > {}", short(&message.peer), message.text);
    }
    fn on_sent(&self, message_id: String) {
        let _ = self.sent.send(message_id);
    }
    fn on_send_failed(&self, message_id: String, reason: String) {
        eprintln!("message {message_id} was refused: {reason}");
        let _ = self.sent.send(message_id);
    }
    fn on_identity_changed(&self, contact: String, safety_number: String) {
        eprintln!(
            "!! the identity key of {contact} changed. Their messages are held.\n   New safety number: {}\n   Compare it with them, then run: privcomm-chat trust {contact}",
            group(&safety_number)
        );
    }
    fn on_undecryptable(&self, from: String, reason: String) {
        eprintln!("a message from {} could not be decrypted: {reason}", short(&from));
    }
}

struct CallPrinter(std::sync::mpsc::Sender<CallInfo>);

impl CallListener for CallPrinter {
    fn on_call_changed(&self, call: CallInfo) {
        match (call.state, call.end_reason) {
            (CallState::Ended, Some(reason)) => eprintln!("call ended: {reason:?} {}", call.detail),
            (state, _) => eprintln!("call with {}: {state:?}", short(&call.peer)),
        }
        let _ = self.0.send(call);
    }
}

/// Waits for a change of a call that `wanted` accepts (`Err` if it ends first).
fn await_call(
    calls: &std::sync::mpsc::Receiver<CallInfo>,
    wanted: impl Fn(&CallInfo) -> bool,
) -> Result<CallInfo, String> {
    loop {
        let call = calls.recv().map_err(|_| "the client closed")?;
        if wanted(&call) {
            return Ok(call);
        }
        if call.state == CallState::Ended {
            return Err("the call ended".into());
        }
    }
}

/// Sends `hz` and prints what is heard, every second, until the call ends or `until` passes.
fn talk(
    client: &Client,
    calls: &std::sync::mpsc::Receiver<CallInfo>,
    call_id: &str,
    hz: f64,
    until: Option<std::time::Instant>,
) -> Result<(), String> {
    let mut tone = Tone::new(hz, SAMPLE_RATE);
    let mut heard = Vec::new();
    let mut next = std::time::Instant::now();
    loop {
        if let Ok(call) = calls.try_recv()
            && call.call_id == call_id
            && call.state == CallState::Ended
        {
            return Ok(());
        }
        if until.is_some_and(|until| std::time::Instant::now() >= until) {
            return client.hang_up(call_id.to_owned()).map_err(|e| e.to_string());
        }
        client.push_audio(call_id.to_owned(), tone.next_frame(FRAME_SAMPLES)).map_err(|e| e.to_string())?;
        heard.extend(client.pull_audio(call_id.to_owned()).map_err(|e| e.to_string())?);
        if heard.len() >= SAMPLE_RATE as usize {
            let level = rms(&heard);
            if level < 100.0 {
                println!("hearing silence");
            } else {
                println!("hearing {} Hz (RMS {level:.0})", dominant(&heard, 100, 2_000, SAMPLE_RATE));
            }
            heard.clear();
        }
        next += std::time::Duration::from_millis(20);
        std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
    }
}

fn short(user: &str) -> &str {
    &user[..user.len().min(8)]
}

/// `12345 67890 …`, as Signal's apps show it.
fn group(number: &str) -> String {
    number.as_bytes().chunks(5).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(" ")
}

fn store_key(store: &Path) -> Result<Vec<u8>, String> {
    if let Ok(hex_key) = std::env::var("PRIVCOMM_STORE_KEY") {
        return hex::decode(hex_key.trim()).map_err(|_| "PRIVCOMM_STORE_KEY must be 64 hex digits".to_owned());
    }
    let path = store.with_extension("key");
    match std::fs::read(&path) {
        Ok(key) => Ok(key),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut key = vec![0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
            file.write_all(&key).map_err(|e| format!("writing {}: {e}", path.display()))?;
            Ok(key)
        }
        Err(error) => Err(format!("reading {}: {error}", path.display())),
    }
}

fn bench(messages: usize, burst: usize, dir: &Path) -> Result<(), String> {
    use privcomm_client::bench::quantile;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let figures = runtime.block_on(privcomm_client::bench::run(messages, burst, dir)).map_err(|e| e.to_string())?;
    println!(
        "privcomm client: {messages} messages A → B, bursts of {} per commit, µs per message with its share of the commit (store in {})",
        figures.burst,
        dir.display()
    );
    println!("{:<34} {:>9} {:>9}", "", "p50", "p99");
    let rows = [
        ("raw libsignal encrypt (in memory)", &figures.raw_encrypt, None),
        ("client encrypt + persist", &figures.store_encrypt, Some(&figures.raw_encrypt)),
        ("raw libsignal decrypt (in memory)", &figures.raw_decrypt, None),
        ("client decrypt + persist", &figures.store_decrypt, Some(&figures.raw_decrypt)),
    ];
    for (name, values, raw) in rows {
        let (p50, p99) = (quantile(values, 0.5), quantile(values, 0.99));
        let ratio =
            raw.map(|raw| format!("   {:.2}× / {:.2}× raw", p50 / quantile(raw, 0.5), p99 / quantile(raw, 0.99)));
        println!("{name:<34} {p50:>9.1} {p99:>9.1}{}", ratio.unwrap_or_default());
    }
    let commits = [
        ("sender's commit per burst", &figures.encrypt_commits),
        ("recipient's commit per burst", &figures.decrypt_commits),
    ];
    for (name, commits) in commits {
        println!("{name:<34} {:>9.1} {:>9.1}", quantile(commits, 0.5), quantile(commits, 0.99));
    }
    println!("wire bytes per message (mean): {:.0}", figures.wire_bytes);
    let (count, micros) = figures.checkpoints;
    println!(
        "background checkpoints (both stores, off the message path): {count}, {:.1} ms in all = {:.2} µs per message",
        micros / 1000.0,
        micros / (2 * messages.max(1)) as f64
    );
    Ok(())
}

fn bench_calls(server: &str, calls: usize, onsets: usize, relay_only: bool, dir: &Path) -> Result<(), String> {
    use privcomm_client::bench::quantile;
    let scratch = dir.join(format!("privcomm-bench-calls-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let figures =
        privcomm_client::call::bench::run(server, calls, onsets, relay_only, &scratch).map_err(|e| e.to_string());
    let _ = std::fs::remove_dir_all(&scratch);
    let figures = figures?;
    println!("privcomm calls between two clients through {server}, ms");
    println!("{:<48} {:>8} {:>8} {:>8}", "", "p50", "p95", "max");
    for (name, values) in [
        (format!("set-up: start_call → both connected ({} calls)", figures.setup_ms.len()), &figures.setup_ms),
        (format!("audio: captured at A → played at B ({} onsets)", figures.latency_ms.len()), &figures.latency_ms),
    ] {
        let max = values.iter().copied().fold(0.0, f64::max);
        println!("{name:<48} {:>8.1} {:>8.1} {max:>8.1}", quantile(values, 0.5), quantile(values, 0.95));
    }
    let p = figures.playout;
    println!(
        "playout at B, frames: {} played, {} concealed, {} late (concealed), {} skipped, {} arrived too late",
        p.played, p.lost, p.late, p.skipped, p.too_late
    );
    Ok(())
}

fn run(cli: Cli) -> Result<(), String> {
    let command = match cli.command {
        Command::Bench { messages, burst, dir } => return bench(messages, burst, &dir),
        Command::BenchCalls { calls, onsets, dir, relay_only } => {
            return bench_calls(&cli.server, calls, onsets, relay_only, &dir);
        }
        command => command,
    };
    let key = store_key(&cli.store)?;
    let (sent_tx, sent) = std::sync::mpsc::channel();
    let (state_tx, states) = std::sync::mpsc::channel();
    let listener: Arc<dyn ClientListener> = Arc::new(Printer { sent: sent_tx, connected: state_tx });
    let config =
        ClientConfig { store_path: cli.store.display().to_string(), store_key: key, server_url: cli.server.clone() };
    let client = Client::new(config, listener).map_err(|e| e.to_string())?;
    let online = || -> Result<(), String> {
        client.connect().map_err(|e| e.to_string())?;
        loop {
            match states.recv_timeout(std::time::Duration::from_secs(120)) {
                Ok(ConnectionState::Connected) => {
                    // What the app does after connecting: keep one-time keys stocked.
                    if let Err(error) = client.maintain_prekeys() {
                        eprintln!("prekey maintenance failed (messages still flow): {error}");
                    }
                    return Ok(());
                }
                Ok(ConnectionState::Error) => return Err(format!("cannot connect to {}", cli.server)),
                Ok(_) => {}
                Err(_) => return Err(format!("no connection to {} after 2 minutes", cli.server)),
            }
        }
    };
    match command {
        Command::Register { phone } => {
            let user = client.register(phone).map_err(|e| e.to_string())?;
            println!("{user}");
            eprintln!("registered; share this user id with your contacts");
        }
        Command::Whoami => match client.user_id().map_err(|e| e.to_string())? {
            Some(user) => println!("{user}"),
            None => return Err("not registered yet: run `privcomm-chat register <phone>`".into()),
        },
        Command::SafetyNumber { contact } => {
            println!("{}", group(&client.safety_number(contact).map_err(|e| e.to_string())?));
        }
        Command::Send { to, text } => {
            online()?;
            let id = client.send_text(to, text).map_err(|e| e.to_string())?;
            while sent.recv_timeout(std::time::Duration::from_secs(30)).map_err(|_| "not accepted within 30 s")? != id {
            }
            eprintln!("sent");
        }
        Command::Chat { contact } => {
            online()?;
            eprintln!("connected; type a line and press Enter to send it (Ctrl-D to quit)");
            for line in std::io::stdin().lock().lines() {
                let line = line.map_err(|e| e.to_string())?;
                if line.trim().is_empty() {
                    continue;
                }
                if let Err(error) = client.send_text(contact.clone(), line) {
                    eprintln!("not sent: {error}");
                }
            }
        }
        Command::Listen => {
            online()?;
            eprintln!("connected; waiting for messages (Ctrl-C to quit)");
            loop {
                std::thread::park();
            }
        }
        Command::History => {
            for message in client.messages().map_err(|e| e.to_string())? {
                let arrow = if message.outgoing { "<" } else { ">" };
                println!("{} {arrow} {}", short(&message.peer), message.text);
            }
        }
        Command::Trust { contact } => {
            client.trust_identity(contact).map_err(|e| e.to_string())?;
            eprintln!("trusted; held messages are delivered");
        }
        Command::MaintainPrekeys => {
            let report = client.maintain_prekeys().map_err(|e| e.to_string())?;
            println!("{report:?}");
        }
        Command::Call { contact, tone, seconds } => {
            let (calls_tx, calls) = std::sync::mpsc::channel();
            client.set_call_listener(Arc::new(CallPrinter(calls_tx)));
            online()?;
            let id = client.start_call(contact).map_err(|e| e.to_string())?;
            await_call(&calls, |c| c.call_id == id && c.state == CallState::Connected)?;
            let until = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
            talk(&client, &calls, &id, tone, Some(until))?;
        }
        Command::Answer { tone } => {
            let (calls_tx, calls) = std::sync::mpsc::channel();
            client.set_call_listener(Arc::new(CallPrinter(calls_tx)));
            online()?;
            eprintln!("connected; waiting for a call (Ctrl-C to quit)");
            let incoming = await_call(&calls, |c| c.state == CallState::Incoming)?;
            client.accept_call(incoming.call_id.clone()).map_err(|e| e.to_string())?;
            await_call(&calls, |c| c.call_id == incoming.call_id && c.state == CallState::Connected)?;
            talk(&client, &calls, &incoming.call_id, tone, None)?;
        }
        Command::Bench { .. } | Command::BenchCalls { .. } => {}
    }
    client.shutdown();
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}
