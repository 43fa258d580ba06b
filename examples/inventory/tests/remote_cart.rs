//! The reference application with its cart function in another process: `inventory-node
//! cart-server` hosts the unchanged cart function (HTTP and gRPC on one port, no state
//! of its own), and `inventory-demo --remote-cart` runs the region with the cart
//! reached remotely (its basket state shipped with every batch, registered through the
//! state handshake). The business invariants must hold exactly as with the embedded
//! cart.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The server process, and its stdout, kept open: closing the pipe would make the
/// server's next print fail.
struct CartServer(Child, #[allow(dead_code)] BufReader<std::process::ChildStdout>);

impl Drop for CartServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the cart server of region north on a free port; returns it and its address.
fn cart_server() -> (CartServer, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_inventory-node"))
        .args(["cart-server", "--region", "north", "--listen", "127.0.0.1:0"])
        // The demo's abandonment timeout (the cart's timer is the server's setting).
        .args(["--abandon-after-ms", "1500"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the cart server starts");
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    (CartServer(child, out), line.trim().to_owned())
}

fn demo_passes_with(url: &str, transport: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_inventory-demo"))
        .args([
            "--regions",
            "1",
            "--seconds",
            "3",
            "--rate",
            "2000",
            "--state",
            "memory",
        ])
        .args(["--remote-cart", url, "--remote-cart-transport", transport])
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("invariant check: PASS"),
        "{transport}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The cart was the remote one, and baskets were checked out through it.
    assert!(
        stdout.contains(&format!("cart: a remote function at {url}")),
        "{stdout}"
    );
    assert!(stdout.contains("checked out"), "{stdout}");
}

#[test]
fn the_retail_region_keeps_every_invariant_with_its_cart_served_remotely_over_http() {
    let (_server, addr) = cart_server();
    demo_passes_with(&format!("http://{addr}/statefun"), "http");
}

#[test]
fn the_retail_region_keeps_every_invariant_with_its_cart_served_remotely_over_grpc() {
    let (_server, addr) = cart_server();
    demo_passes_with(&format!("http://{addr}"), "grpc");
}
