//! `tscf client --tun [NAME]`: a TUN device joined to the tunnel, so that unmodified
//! applications (`ping`, `iperf3`, `curl`) reach other clients' internal addresses.
//!
//! The device gets the tunnel's internal IPv4 and IPv6 addresses with the prefixes of the
//! server's pools, so the kernel routes the pools to it, and an MTU of the tunnel's largest
//! inner packet. Every IP packet the kernel sends there goes into the tunnel; every inner
//! packet for this client that no forward of this program claims (an inner socket bound to
//! its UDP port, an inner TCP stream or listener on its TCP port) comes out of it: the
//! tunnel's packet tap ([`Tunnel::tap`]).

use std::io;
use std::path::Path;

use futures_lite::future;
use tscf_runtime_smol::{PacketTap, Tunnel};
use tun_rs::{AsyncDevice, DeviceBuilder};

/// The device's name when `--tun` names none.
pub(crate) const DEFAULT_NAME: &str = "tscf0";

/// What `--tun` set up, to print.
pub(crate) struct TunInfo {
    pub(crate) name: String,
    pub(crate) mtu: usize,
}

/// Creates the TUN device `name` with `tunnel`'s addresses, and takes the tunnel's tap.
/// The error says what is missing: root (CAP_NET_ADMIN) or `/dev/net/tun`.
pub(crate) fn open(
    name: &str,
    tunnel: &Tunnel,
) -> Result<(AsyncDevice, PacketTap, TunInfo), String> {
    if !Path::new("/dev/net/tun").exists() {
        return Err(
            "--tun: /dev/net/tun does not exist (load the tun module, or give the \
                    container the device)"
                .into(),
        );
    }
    let info = tunnel
        .info()
        .ok_or("--tun: the tunnel has no configuration")?;
    let mtu = info.max_packet_len.min(usize::from(u16::MAX));
    let mut builder = DeviceBuilder::new().name(name).mtu(mtu as u16);
    if let Some(v4) = info.ipv4 {
        builder = builder.ipv4(v4.addr, v4.prefix_len, None);
    }
    if let Some(v6) = info.ipv6 {
        builder = builder.ipv6(v6.addr, v6.prefix_len);
    }
    let device = builder.build_async().map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => {
            format!("--tun: cannot create {name}: {e} (it needs root or CAP_NET_ADMIN)")
        }
        _ => format!("--tun: cannot create {name}: {e}"),
    })?;
    let tap = tunnel
        .tap()
        .map_err(|e| format!("--tun: the tunnel's tap: {e}"))?;
    let info = TunInfo {
        name: device.name().unwrap_or_else(|_| name.to_owned()),
        mtu,
    };
    Ok((device, tap, info))
}

/// Moves packets between the device and the tunnel until either fails.
pub(crate) async fn run(device: AsyncDevice, tap: PacketTap) {
    let up = async {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = device.recv(&mut buf).await {
            // Refused (not from the tunnel's address, a full queue): lost, as on a link.
            let _ = tap.send(&buf[..n]);
        }
    };
    let down = async {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = tap.recv(&mut buf).await {
            if device.send(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    future::or(up, down).await;
}
