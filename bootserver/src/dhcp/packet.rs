//! DHCPv4 request parsing and reply encoding.
//!
//! Requests are read without allocating: the fixed header through dhcproto's
//! zero-copy [`borrowed::Message`], the options through a strict walker that
//! refuses malformed option areas (dhcproto's iterator silently stops at the
//! first bad option, which would let a truncated packet pass as a short valid
//! one). Replies are built with dhcproto's owned [`Message`] and encoder, then
//! padded to the 300-byte BOOTP minimum that some PXE ROMs insist on.

use std::net::Ipv4Addr;

use dhcproto::v4::{
    self, borrowed, DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode,
};
use dhcproto::{Encodable, Encoder};

use crate::mac::MacAddr;

/// Smallest reply size some PXE ROMs accept (BOOTP's 300 bytes).
pub const MIN_REPLY_LEN: usize = 300;

/// Why a datagram was dropped without a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPacket {
    /// Shorter than the fixed header plus the magic cookie.
    #[error("too short")]
    TooShort,
    /// Not a BOOTREQUEST.
    #[error("not a BOOTREQUEST")]
    NotRequest,
    /// Not Ethernet with a 6-byte hardware address.
    #[error("not an Ethernet hardware address")]
    NotEthernet,
    /// The magic cookie is missing.
    #[error("no DHCP magic cookie")]
    NoCookie,
    /// Options run past the end or there is no End option.
    #[error("malformed options")]
    BadOptions,
    /// No or an unknown message type option.
    #[error("no valid message type")]
    NoMessageType,
    /// An option has the wrong length for its type.
    #[error("option {0} has a bad length")]
    BadOptionLength(u8),
}

/// The fields of a request the server acts on, borrowed from the datagram.
#[derive(Debug)]
pub struct Request<'a> {
    /// The whole datagram, through dhcproto's zero-copy reader.
    pub msg: borrowed::Message<'a>,
    /// Option 53.
    pub msg_type: MessageType,
    /// `chaddr`.
    pub mac: MacAddr,
    /// Option 50.
    pub requested_ip: Option<Ipv4Addr>,
    /// Option 54.
    pub server_id: Option<Ipv4Addr>,
    /// Option 12.
    pub hostname: Option<&'a [u8]>,
    /// Option 60.
    pub vendor_class: Option<&'a [u8]>,
    /// Option 77.
    pub user_class: Option<&'a [u8]>,
    /// Option 93, first architecture in the list.
    pub arch: Option<u16>,
    /// Option 97.
    pub machine_id: Option<&'a [u8]>,
    /// Option 55.
    pub params: &'a [u8],
}

fn ipv4(data: &[u8], code: u8) -> Result<Ipv4Addr, BadPacket> {
    let arr: [u8; 4] = data
        .try_into()
        .map_err(|_| BadPacket::BadOptionLength(code))?;
    Ok(Ipv4Addr::from(arr))
}

/// Parses and validates a request datagram.
pub fn parse(buf: &[u8]) -> Result<Request<'_>, BadPacket> {
    if buf.len() < 240 {
        return Err(BadPacket::TooShort);
    }
    let msg = borrowed::Message::new(buf).map_err(|_| BadPacket::TooShort)?;
    if msg.opcode() != Opcode::BootRequest {
        return Err(BadPacket::NotRequest);
    }
    // hlen is checked before chaddr() is called: the zero-copy reader slices
    // `28..28 + hlen` and must never see an hlen past the 16-byte field.
    if msg.htype() != HType::Eth || msg.hlen() != 6 {
        return Err(BadPacket::NotEthernet);
    }
    if buf[236..240] != v4::MAGIC {
        return Err(BadPacket::NoCookie);
    }
    let mac = MacAddr::from_slice(msg.chaddr()).ok_or(BadPacket::NotEthernet)?;
    let mut req = Request {
        msg,
        msg_type: MessageType::Unknown(0),
        mac,
        requested_ip: None,
        server_id: None,
        hostname: None,
        vendor_class: None,
        user_class: None,
        arch: None,
        machine_id: None,
        params: &[],
    };
    let mut msg_type = None;
    let opts = &buf[240..];
    let mut i = 0;
    let mut ended = false;
    while i < opts.len() {
        let code = opts[i];
        if code == 0 {
            i += 1;
            continue;
        }
        if code == 255 {
            ended = true;
            break;
        }
        let len = *opts.get(i + 1).ok_or(BadPacket::BadOptions)? as usize;
        let data = opts.get(i + 2..i + 2 + len).ok_or(BadPacket::BadOptions)?;
        i += 2 + len;
        match code {
            53 => {
                let [t] = data else {
                    return Err(BadPacket::BadOptionLength(code));
                };
                msg_type.get_or_insert(MessageType::from(*t));
            }
            50 => {
                req.requested_ip.get_or_insert(ipv4(data, code)?);
            }
            54 => {
                req.server_id.get_or_insert(ipv4(data, code)?);
            }
            12 => {
                req.hostname.get_or_insert(data);
            }
            60 => {
                req.vendor_class.get_or_insert(data);
            }
            77 => {
                req.user_class.get_or_insert(data);
            }
            93 => {
                if data.len() < 2 || data.len() % 2 != 0 {
                    return Err(BadPacket::BadOptionLength(code));
                }
                req.arch
                    .get_or_insert(u16::from_be_bytes([data[0], data[1]]));
            }
            97 => {
                req.machine_id.get_or_insert(data);
            }
            55 if req.params.is_empty() => req.params = data,
            _ => {}
        }
    }
    if !ended {
        return Err(BadPacket::BadOptions);
    }
    match msg_type {
        Some(
            t @ (MessageType::Discover
            | MessageType::Request
            | MessageType::Decline
            | MessageType::Release
            | MessageType::Inform),
        ) => req.msg_type = t,
        _ => return Err(BadPacket::NoMessageType),
    }
    Ok(req)
}

impl Request<'_> {
    /// Whether the client asked for a broadcast reply.
    pub fn broadcast_flag(&self) -> bool {
        self.msg.flags().broadcast()
    }

    /// The hostname option as UTF-8, if it is a sane host name.
    pub fn hostname_str(&self) -> Option<&str> {
        let h = std::str::from_utf8(self.hostname?).ok()?;
        let ok = !h.is_empty()
            && h.len() <= 63
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        ok.then_some(h)
    }
}

/// What a reply carries beyond the header.
#[derive(Debug, Default, Clone)]
pub struct ReplyOptions {
    /// Option 1.
    pub subnet_mask: Option<Ipv4Addr>,
    /// Option 3.
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Option 15.
    pub domain: Option<String>,
    /// Option 12.
    pub hostname: Option<String>,
    /// Option 28.
    pub broadcast: Option<Ipv4Addr>,
    /// Options 51 / 58 / 59 (T1 = 1/2, T2 = 7/8).
    pub lease_time: Option<u32>,
    /// PXE boot information.
    pub boot: Option<PxeBoot>,
    /// Option 56, for NAKs.
    pub message: Option<String>,
}

/// Boot information for a PXE / HTTP-boot / iPXE client.
#[derive(Debug, Clone)]
pub struct PxeBoot {
    /// Boot file: TFTP path or URL (`file` and option 67).
    pub file: String,
    /// Option 60 answer: `PXEClient` or `HTTPClient`.
    pub vendor_class: &'static str,
    /// Whether to add option 43 with PXE discovery control = 8 (use the file
    /// given, no boot-server discovery).
    pub discovery_control: bool,
    /// Option 97 echoed back, if the client sent a well-formed one.
    pub machine_id: Option<Vec<u8>>,
}

/// Builds and encodes a reply to `req`.
pub fn build_reply(
    req: &Request<'_>,
    msg_type: MessageType,
    server: Ipv4Addr,
    yiaddr: Ipv4Addr,
    ciaddr: Ipv4Addr,
    opts: &ReplyOptions,
    out: &mut Vec<u8>,
) -> Result<(), dhcproto::error::EncodeError> {
    let mut m = Message::new_with_id(
        req.msg.xid(),
        ciaddr,
        yiaddr,
        if opts.boot.is_some() {
            server
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        req.msg.giaddr(),
        &req.mac.0,
    );
    m.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_flags(if req.broadcast_flag() {
            Flags::default().set_broadcast()
        } else {
            Flags::default()
        });
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(msg_type));
    o.insert(DhcpOption::ServerIdentifier(server));
    if let Some(mask) = opts.subnet_mask {
        o.insert(DhcpOption::SubnetMask(mask));
    }
    if let Some(r) = opts.router {
        o.insert(DhcpOption::Router(vec![r]));
    }
    if !opts.dns.is_empty() {
        o.insert(DhcpOption::DomainNameServer(opts.dns.clone()));
    }
    if let Some(d) = &opts.domain {
        o.insert(DhcpOption::DomainName(d.clone()));
    }
    if let Some(h) = &opts.hostname {
        o.insert(DhcpOption::Hostname(h.clone()));
    }
    if let Some(b) = opts.broadcast {
        o.insert(DhcpOption::BroadcastAddr(b));
    }
    if let Some(t) = opts.lease_time {
        o.insert(DhcpOption::AddressLeaseTime(t));
        o.insert(DhcpOption::Renewal(t / 2));
        o.insert(DhcpOption::Rebinding(t / 8 * 7));
    }
    if let Some(msg) = &opts.message {
        o.insert(DhcpOption::Message(msg.clone()));
    }
    if let Some(b) = &opts.boot {
        o.insert(DhcpOption::ClassIdentifier(
            b.vendor_class.as_bytes().to_vec(),
        ));
        o.insert(DhcpOption::TFTPServerName(server.to_string().into_bytes()));
        o.insert(DhcpOption::BootfileName(b.file.as_bytes().to_vec()));
        if b.discovery_control {
            // Encapsulated PXE options: sub-option 6 (PXE_DISCOVERY_CONTROL),
            // length 1, value 8 (download the boot file named here), then End.
            o.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        }
        if let Some(id) = &b.machine_id {
            o.insert(DhcpOption::ClientMachineIdentifier(id.clone()));
        }
        m.set_sname_str(server.to_string());
        if b.file.len() < 128 {
            m.set_fname_str(&b.file);
        }
    }
    out.clear();
    let mut enc = Encoder::new(out);
    m.encode(&mut enc)?;
    if out.len() < MIN_REPLY_LEN {
        out.resize(MIN_REPLY_LEN, 0);
    }
    Ok(())
}

/// Reads the option list of an encoded reply (tests and diagnostics).
pub fn option_codes(buf: &[u8]) -> Vec<OptionCode> {
    match borrowed::Message::new(buf) {
        Ok(m) => m.opts().map(|o| o.code()).collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::Decodable;

    pub(crate) fn discover(mac: [u8; 6], extra: Vec<DhcpOption>) -> Vec<u8> {
        let mut m = Message::new_with_id(
            0x1234_5678,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        for o in extra {
            m.opts_mut().insert(o);
        }
        let mut out = Vec::new();
        m.encode(&mut Encoder::new(&mut out)).expect("encode");
        out
    }

    #[test]
    fn parses_a_pxe_discover() {
        let buf = discover(
            [0x52, 0x54, 0, 1, 2, 3],
            vec![
                DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007:UNDI:003000".to_vec()),
                DhcpOption::ClientSystemArchitecture(v4::Architecture::from(7)),
                DhcpOption::UserClass(b"iPXE".to_vec()),
            ],
        );
        let r = parse(&buf).expect("valid");
        assert_eq!(r.msg_type, MessageType::Discover);
        assert_eq!(r.arch, Some(7));
        assert_eq!(r.user_class, Some(&b"iPXE"[..]));
        assert_eq!(r.mac.to_string(), "52:54:00:01:02:03");
    }

    #[test]
    fn every_truncation_of_a_valid_request_is_refused() {
        let buf = discover([2, 0, 0, 0, 0, 1], vec![DhcpOption::Hostname("pc1".into())]);
        assert!(parse(&buf).is_ok());
        for len in 0..buf.len() {
            // The End option is the last byte: any shorter prefix lacks it.
            assert!(
                parse(&buf[..len]).is_err(),
                "prefix of {len} bytes accepted"
            );
        }
    }

    #[test]
    fn bogus_hlen_is_refused_without_panicking() {
        let mut buf = discover([2, 0, 0, 0, 0, 1], vec![]);
        buf[2] = 255;
        assert_eq!(parse(&buf).expect_err("hlen 255"), BadPacket::NotEthernet);
    }

    #[test]
    fn reply_is_padded_to_300_bytes_and_carries_pxe_options() {
        let buf = discover(
            [2, 0, 0, 0, 0, 1],
            vec![DhcpOption::ClientMachineIdentifier(vec![0; 17])],
        );
        let r = parse(&buf).expect("valid");
        let mut out = Vec::new();
        let opts = ReplyOptions {
            boot: Some(PxeBoot {
                file: "undionly.kpxe".into(),
                vendor_class: "PXEClient",
                discovery_control: true,
                machine_id: Some(vec![0; 17]),
            }),
            ..Default::default()
        };
        let server = Ipv4Addr::new(10, 213, 0, 1);
        build_reply(
            &r,
            MessageType::Offer,
            server,
            Ipv4Addr::new(10, 213, 0, 100),
            Ipv4Addr::UNSPECIFIED,
            &opts,
            &mut out,
        )
        .expect("encode");
        assert!(out.len() >= MIN_REPLY_LEN);
        let m = Message::decode(&mut dhcproto::Decoder::new(&out)).expect("decodes");
        assert_eq!(m.opcode(), Opcode::BootReply);
        assert_eq!(m.siaddr(), server);
        // dhcproto's decoder keeps the NUL terminator of the field.
        let fname = m.fname().expect("file field");
        assert_eq!(fname.split(|b| *b == 0).next(), Some(&b"undionly.kpxe"[..]));
        let codes = option_codes(&out);
        for c in [43u8, 54, 60, 66, 67, 97] {
            assert!(
                codes.contains(&OptionCode::from(c)),
                "option {c} missing: {codes:?}"
            );
        }
    }
}
