//! Every built-in kind declares which commands only read the device: the
//! node runs those, and only those, on read subjects.

use ottomato_actors::{builtin, CommandClass, Credentials, Task};
use serde_json::{json, Value};

fn classes(kind: &str, config: Value, tasks: &[Task]) -> Vec<CommandClass> {
    let creds = Credentials::default();
    creds
        .load_toml(
            "[c]\nusername = \"u\"\npassword = \"p\"\ncommunity = \"public\"\n",
            |_| None,
        )
        .unwrap();
    let kinds = builtin(&creds);
    let k = kinds.iter().find(|k| k.name() == kind).unwrap();
    let w = k.create("w", &config).unwrap();
    tasks.iter().map(|t| w.command_class(t)).collect()
}

fn t(command: &str) -> Task {
    Task::new(command)
}

use CommandClass::{Read, Write};

#[test]
fn each_kind_reads_with_its_read_commands_and_nothing_else() {
    let names = |v: &[&str]| v.iter().map(|c| t(c)).collect::<Vec<_>>();
    let sim = names(&[
        "echo", "hello", "sleep", "fail", "panic", "info", "set", "nope",
    ]);
    assert_eq!(
        classes("sim", json!({}), &sim),
        [Read, Read, Read, Read, Read, Read, Write, Write]
    );
    let tcp = json!({"host": "127.0.0.1", "port": 1});
    assert_eq!(classes("tcp", tcp, &names(&["probe", "x"])), [Read, Write]);
    let http = json!({"baseUrl": "http://127.0.0.1:1"});
    let verbs = names(&["get", "post", "put", "patch", "delete"]);
    assert_eq!(
        classes("http", http, &verbs),
        [Read, Write, Write, Write, Write]
    );
    // A GET with the caller's headers, a body or `..` may act: write.
    let get = |kw: Value| {
        let mut t = t("get");
        t.kwargs = kw.as_object().unwrap().clone();
        t
    };
    let gets = [
        get(json!({"path": "/status"})),
        get(json!({"path": "/status", "headers": {"X-HTTP-Method-Override": "DELETE"}})),
        get(json!({"path": "/status", "json": {}})),
        get(json!({"path": "/a/../cgi-bin/reboot"})),
        get(json!({"path": "/a/%2E%2E/reboot"})),
        get(json!({"path": "/status", "typo": 1})),
    ];
    let http = json!({"baseUrl": "http://127.0.0.1:1"});
    assert_eq!(
        classes("http", http, &gets),
        [Read, Write, Write, Write, Write, Write]
    );
    // With readOnlyPaths, only those paths read.
    let http = json!({"baseUrl": "http://127.0.0.1:1", "readOnlyPaths": ["/status"]});
    let listed = [
        get(json!({"path": "/status"})),
        get(json!({"path": "/reboot"})),
    ];
    assert_eq!(classes("http", http, &listed), [Read, Write]);
    let modbus = json!({"host": "127.0.0.1", "port": 1});
    let cmds = names(&[
        "read_coils",
        "read_discrete_inputs",
        "read_holding_registers",
        "read_input_registers",
        "read",
        "poll",
        "write_single_coil",
        "write_multiple_coils",
        "write_single_register",
        "write_multiple_registers",
        "write",
    ]);
    let got = classes("modbus", modbus, &cmds);
    assert_eq!(got[..6], [Read; 6]);
    assert_eq!(got[6..], [Write; 5]);
    let snmp = json!({"host": "127.0.0.1", "port": 1, "version": "2c", "credentials": "c"});
    let cmds = names(&["get", "getnext", "walk", "bulkwalk", "poll", "set"]);
    assert_eq!(
        classes("snmp", snmp, &cmds),
        [Read, Read, Read, Read, Read, Write]
    );
    let ssh = json!({"host": "127.0.0.1", "port": 1, "credentials": "c",
                     "hostKeyFingerprint": "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                     "readOnlyCommands": ["show version", "show clock"]});
    let exec = |c: &str| t("exec").kwarg("command", c);
    let send = |cs: &[&str]| t("send").kwarg("commands", json!(cs));
    assert_eq!(
        classes(
            "ssh",
            ssh,
            &[
                exec("show version"),
                exec("show version; reload"),
                exec("show  version"),
                send(&["show version", "show clock"]),
                send(&["show version", "conf t"]),
                send(&[]),
                t("exec"),
            ]
        ),
        [Read, Write, Write, Read, Write, Write, Write]
    );
}
