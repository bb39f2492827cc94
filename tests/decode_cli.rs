//! `fleetgate decode` as an operator runs it: the real binary, hex in arguments or on standard
//! input, one JSON object per line out, checked against the documentation's worked examples.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

#[path = "fixtures/wiki.rs"]
mod wiki;
use wiki::{row, rows, Row};

/// Runs `fleetgate decode ARGS` with `stdin` (if any) and returns the exit code and the parsed
/// stdout lines.
fn decode(args: &[&str], stdin: Option<&str>) -> (i32, Vec<Value>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetgate"));
    cmd.arg("decode").args(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("spawn fleetgate");
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(input.as_bytes()).unwrap();
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(stdout).unwrap();
    let lines = stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "not JSON ({e}): {l:?}; stderr: {}",
                    String::from_utf8_lossy(&stderr)
                )
            })
        })
        .collect();
    (status.code().expect("exit code"), lines)
}

fn io_text(r: &Value) -> String {
    r["io"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| match e.get("value") {
            Some(v) => format!("{}:{}", e["id"], v),
            None => format!("{}:{}", e["id"], e["hex"].as_str().unwrap()),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn check_avl(row: &Row, v: &Value) {
    let id = &row.id;
    assert_eq!(v["kind"], "avl", "{id}: {v}");
    assert_eq!(v["codec"], row.codec, "{id}");
    assert_eq!(v["ack"], row.fact("ack").unwrap(), "{id}");
    let n: u64 = row.fact("records").unwrap().parse().unwrap();
    assert_eq!(v["record_count"], n, "{id}");
    let recs = v["records"].as_array().unwrap();
    assert_eq!(recs.len() as u64, n, "{id}");
    assert_eq!(
        recs[0]["ts_ms"].to_string(),
        row.fact("r0.ts_ms").unwrap(),
        "{id}"
    );
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(
            io_text(r),
            row.fact(&format!("r{i}.io")).unwrap(),
            "{id} r{i}"
        );
        assert_eq!(
            r["event_io"].to_string(),
            row.fact(&format!("r{i}.event_io")).unwrap()
        );
        if let Some(g) = row.fact(&format!("r{i}.gen_type")) {
            assert_eq!(r["gen_type"].to_string(), g, "{id} r{i}");
        }
        for k in ["lat", "lon"] {
            let want: f64 = row.fact(&format!("r{i}.{k}")).unwrap().parse().unwrap();
            assert_eq!(r[k].as_f64(), Some(want), "{id} r{i}.{k}");
        }
    }
    if row.transport == "udp" {
        assert_eq!(v["imei"], row.fact("imei").unwrap(), "{id}");
        assert_eq!(v["packet_id"], row.fact("packet_id").unwrap(), "{id}");
    } else {
        assert_eq!(v["crc"], row.fact("crc").unwrap(), "{id}");
    }
}

#[test]
fn every_avl_example_as_an_argument() {
    let avl: Vec<Row> = rows().into_iter().filter(|r| r.kind == "avl").collect();
    assert_eq!(avl.len(), 8);
    for row in &avl {
        let mut args = vec![row.hex.as_str()];
        if row.transport == "udp" {
            args.insert(0, "--udp");
        }
        let (code, out) = decode(&args, None);
        assert_eq!(code, 0, "{}", row.id);
        assert_eq!(out.len(), 1, "{}: {out:?}", row.id);
        check_avl(row, &out[0]);
    }
}

#[test]
fn every_good_tcp_example_on_stdin_in_order() {
    let good: Vec<Row> = rows()
        .into_iter()
        .filter(|r| r.transport == "tcp" && !matches!(r.kind.as_str(), "bad" | "server_ack"))
        .collect();
    // Comments and blank lines are skipped; whitespace inside a line is not significant.
    let mut input = String::from("# captured on a test rig\n\n");
    for r in &good {
        let spaced: Vec<&str> = (0..r.hex.len())
            .step_by(2)
            .map(|i| &r.hex[i..i + 2])
            .collect();
        input.push_str(&spaced.join(" "));
        input.push('\n');
    }
    let (code, out) = decode(&[], Some(&input));
    assert_eq!(code, 0, "{out:?}");
    assert_eq!(out.len(), good.len());
    for (r, v) in good.iter().zip(&out) {
        match r.kind.as_str() {
            "imei" => {
                assert_eq!(v["kind"], "login");
                assert_eq!(v["imei"], r.fact("imei").unwrap());
                assert_eq!(v["ack"], r.fact("reply_accept").unwrap());
            }
            "avl" => check_avl(r, v),
            _ => {
                assert_eq!(v["kind"], "command", "{}", r.id);
                assert_eq!(v["codec"], r.codec, "{}", r.id);
                assert_eq!(v["type"], r.fact("type").unwrap(), "{}", r.id);
                assert_eq!(v["ack"], Value::Null, "{}", r.id);
                let text = r.fact("text").or(r.fact("tail_text")).unwrap();
                assert_eq!(v["text"], text, "{}", r.id);
                if let Some(imei) = r.fact("imei") {
                    assert_eq!(v["imei"], imei, "{}", r.id);
                }
            }
        }
    }
}

#[test]
fn every_udp_example_on_stdin() {
    let udp: Vec<Row> = rows()
        .into_iter()
        .filter(|r| r.transport == "udp" && r.kind == "avl")
        .collect();
    let input: String = udp.iter().map(|r| format!("{}\n", r.hex)).collect();
    let (code, out) = decode(&["--udp"], Some(&input));
    assert_eq!(code, 0);
    assert_eq!(out.len(), udp.len());
    for (r, v) in udp.iter().zip(&out) {
        check_avl(r, v);
        assert_eq!(v["avl_packet_id"], r.fact("avl_packet_id").unwrap());
    }
}

#[test]
fn bad_crc_example_fails_with_status_1() {
    let bad = row("wk_c14_nack_badcrc");
    let (code, out) = decode(&[&bad.hex], None);
    assert_eq!(code, 1);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["kind"], "error");
    assert_eq!(out[0]["error_kind"], "crc");
    assert_eq!(
        out[0]["error"],
        "CRC mismatch: frame says 0x32ac, data gives 0x635e"
    );
    assert_eq!(out[0]["ack"], Value::Null);
}

#[test]
fn one_bad_line_among_good_ones_still_prints_every_line() {
    let input = format!(
        "{}\n{}\nnot hex\n{}\n",
        row("wk_c8_ex1").hex,
        row("wk_c14_nack_badcrc").hex,
        row("wk_c16_ex1").hex
    );
    let (code, out) = decode(&[], Some(&input));
    assert_eq!(code, 1);
    let kinds: Vec<&str> = out.iter().map(|v| v["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["avl", "error", "error", "avl"]);
    assert_eq!(out[2]["error_kind"], "hex");
}

#[test]
fn glued_items_and_an_incomplete_frame() {
    let c8 = row("wk_c8_ex1").hex;
    let glued = format!("ff{}ff{c8}", row("wk_imei").hex);
    let (code, out) = decode(&[&glued], None);
    assert_eq!(code, 0);
    let kinds: Vec<&str> = out.iter().map(|v| v["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ping", "login", "ping", "avl"]);
    assert_eq!(out[3]["ack"], "00000001");

    let (code, out) = decode(&[&c8[..c8.len() - 8]], None);
    assert_eq!(code, 1);
    assert_eq!(out[0]["error"], "incomplete: 4 more bytes needed");
    assert_eq!(out[0]["error_kind"], "incomplete");
}

#[test]
fn frame_limit_flag() {
    let c8 = row("wk_c8_ex1").hex;
    let (code, out) = decode(&["--max-frame-len", "53", &c8], None);
    assert_eq!(code, 1);
    assert_eq!(out[0]["error_kind"], "frame_too_large");
    let (code, _) = decode(&["--max-frame-len", "54", &c8], None);
    assert_eq!(code, 0);
}
