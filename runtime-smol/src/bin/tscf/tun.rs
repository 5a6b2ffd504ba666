//! `tscf client --tun [NAME]`: a TUN device joined to the tunnel, so that unmodified
//! applications (`ping`, `iperf3`, `curl`) reach other clients' internal addresses.
//!
//! The device gets the tunnel's internal IPv4 and IPv6 addresses with the prefixes of the
//! server's pools, so the kernel routes the pools to it, and an MTU of the tunnel's largest
//! inner packet. Every IP packet the kernel sends there goes into the tunnel; every inner
//! packet for this client that no forward of this program claims (an inner socket bound to
//! its UDP port, an inner TCP stream or listener on its TCP port) comes out of it: the
//! tunnel's packet tap ([`Tunnel::tap`]).
//!
//! Where the kernel offers it, the device runs with offloads (a virtio-net header on each
//! read and write): one read may be a TCP or UDP segment of up to 64 KiB that is split here
//! into packets of at most the MTU, and packets of one flow written together are coalesced
//! into one write. Packets move in batches both ways: what the device gave in a read or two
//! goes into the tunnel under one lock (and leaves its socket in as few system calls as the
//! system allows), and what the tunnel queued goes to the device together.

use std::io;
use std::path::Path;

use futures_lite::future;
use tscf_runtime_smol::{PacketTap, Tunnel};
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

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
    let build = |offload: bool| {
        let mut builder = DeviceBuilder::new()
            .name(name)
            .mtu(mtu as u16)
            .offload(offload);
        if let Some(v4) = info.ipv4 {
            builder = builder.ipv4(v4.addr, v4.prefix_len, None);
        }
        if let Some(v6) = info.ipv6 {
            builder = builder.ipv6(v6.addr, v6.prefix_len);
        }
        builder.build_async()
    };
    // Offloads if the kernel has them, else one packet per read and write.
    let device = build(true).or_else(|_| build(false));
    let device = device.map_err(|e| match e.kind() {
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

/// Moves packets between the device and the tunnel, whose packets are at most `mtu` octets,
/// until either fails.
pub(crate) async fn run(device: AsyncDevice, tap: PacketTap, mtu: usize) {
    let up = async {
        // A read of up to 64 KiB, split into packets of at most the MTU: room for one whole
        // segment after what the batch holds already.
        let segment = 65_535 / mtu.max(1) + 1;
        let mut read = vec![0u8; VIRTIO_NET_HDR_LEN + 65_535];
        let mut bufs = vec![vec![0u8; mtu]; IDEAL_BATCH_SIZE.max(2 * segment)];
        let mut sizes = vec![0usize; bufs.len()];
        while let Ok(mut count) = device
            .recv_multiple(&mut read, &mut bufs, &mut sizes, 0)
            .await
        {
            while bufs.len() - count >= segment {
                let more =
                    device.try_recv_multiple(&mut read, &mut bufs[count..], &mut sizes[count..], 0);
                match more {
                    Ok(n) => count += n,
                    Err(_) => break,
                }
            }
            // Refused (not from the tunnel's address, a full queue): lost, as on a link.
            let _ = tap.send_many((0..count).map(|i| &bufs[i][..sizes[i]]));
        }
    };
    let down = async {
        let mut gro = GROTable::default();
        let mut packet = vec![0u8; 65_535];
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); IDEAL_BATCH_SIZE];
        // Each packet goes after room for the virtio-net header the device may need.
        let fill = |buf: &mut Vec<u8>, packet: &[u8]| {
            buf.clear();
            buf.resize(VIRTIO_NET_HDR_LEN, 0);
            buf.extend_from_slice(packet);
        };
        while let Ok(n) = tap.recv(&mut packet).await {
            fill(&mut bufs[0], &packet[..n]);
            let mut count = 1;
            while count < bufs.len() {
                let Ok(Some(n)) = tap.try_recv(&mut packet) else {
                    break;
                };
                fill(&mut bufs[count], &packet[..n]);
                count += 1;
            }
            let sent = device.send_multiple(&mut gro, &mut bufs[..count], VIRTIO_NET_HDR_LEN);
            if sent.await.is_err() {
                return;
            }
        }
    };
    future::or(up, down).await;
}
