//! Pod networking for the local kubelet: each pod gets its own network namespace with one
//! address on a host bridge, like a CNI bridge plugin would give it.
//!
//! Why not 127.0.0.N on the host: the apiserver refuses loopback addresses in EndpointSlices
//! ("may not be in the loopback range"), so Services would never get endpoints. Addresses on
//! a bridge into namespaces this kubelet creates are real pod addresses, reachable from the
//! host (nginx, Prometheus) and never leave the machine.

use std::net::Ipv4Addr;
use std::process::Command;

/// The host bridge and the pod subnet behind it (10.88.0.0/16; 10.88.0.1 is the host).
pub const BRIDGE: &str = "embedroll0";
pub const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const PREFIX: u8 = 16;
const NAMESPACE_PREFIX: &str = "embedroll-pod-";

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Creates the bridge if missing and removes pod namespaces left by an earlier run.
pub fn prepare_host() -> Result<(), String> {
    if ip(&["link", "show", BRIDGE]).is_err() {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{HOST_ADDRESS}/{PREFIX}"),
            "dev",
            BRIDGE,
        ])?;
    }
    ip(&["link", "set", BRIDGE, "up"])?;
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map_err(|e| e.to_string())?;
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        if let Some(name) = line
            .split_whitespace()
            .next()
            .filter(|n| n.starts_with(NAMESPACE_PREFIX))
        {
            let _ = ip(&["netns", "del", name]);
        }
    }
    Ok(())
}

/// The namespace name for a pod address (unique while the address is in use).
pub fn namespace_for(address: Ipv4Addr) -> String {
    let [_, _, c, d] = address.octets();
    format!("{NAMESPACE_PREFIX}{c}-{d}")
}

/// Creates the pod's namespace, its veth pair into the bridge, and its address.
pub fn setup(address: Ipv4Addr) -> Result<String, String> {
    let ns = namespace_for(address);
    let [_, _, c, d] = address.octets();
    let host_side = format!("veth-er-{c}-{d}");
    let _ = ip(&["netns", "del", &ns]);
    ip(&["netns", "add", &ns])?;
    let result = (|| {
        ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["link", "set", &host_side, "master", BRIDGE, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{address}/{PREFIX}"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &HOST_ADDRESS.to_string(),
        ])
    })();
    if let Err(error) = result {
        teardown(address);
        return Err(error);
    }
    Ok(ns)
}

/// Deletes the pod's namespace; its veth pair goes with it.
pub fn teardown(address: Ipv4Addr) {
    let _ = ip(&["netns", "del", &namespace_for(address)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_follow_addresses() {
        assert_eq!(
            namespace_for(Ipv4Addr::new(10, 88, 1, 7)),
            "embedroll-pod-1-7"
        );
        // Linux interface names are at most 15 bytes.
        assert!("veth-er-255-254".len() <= 15);
    }
}
