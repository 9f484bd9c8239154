//! The SSRF guard: tenant-supplied SMTP hosts may only reach public addresses on allowed
//! ports, unless the operator allow-lists a network. The connection then goes to the checked
//! address (never resolved again), while TLS still verifies the host name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Why a destination was refused. Deliberately uniform: it says nothing about the target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// The port is not on the operator's list.
    #[error("port {0} is not allowed for SMTP profiles (allowed: {1})")]
    PortNotAllowed(u16, String),
    /// The host did not resolve.
    #[error("host name could not be resolved")]
    Unresolvable,
    /// Every address is non-public and not allow-listed.
    #[error("destination is not allowed")]
    Refused,
}

/// The operator's rules.
#[derive(Debug, Clone)]
pub struct Guard {
    allowed_ports: Vec<u16>,
    allowed_networks: Vec<IpNet>,
}

impl Guard {
    /// A guard with the operator's allowed ports and networks.
    pub fn new(allowed_ports: Vec<u16>, allowed_networks: Vec<IpNet>) -> Self {
        Self {
            allowed_ports,
            allowed_networks,
        }
    }

    /// Checks the port before any lookup.
    pub fn check_port(&self, port: u16) -> Result<(), GuardError> {
        if self.allowed_ports.contains(&port) {
            Ok(())
        } else {
            let list = self
                .allowed_ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            Err(GuardError::PortNotAllowed(port, list))
        }
    }

    /// Resolves `host` and keeps only the addresses it may connect to.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, GuardError> {
        self.check_port(port)?;
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|_| GuardError::Unresolvable)?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(GuardError::Unresolvable);
        }
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| self.is_allowed(a.ip()))
            .collect();
        if allowed.is_empty() {
            Err(GuardError::Refused)
        } else {
            Ok(allowed)
        }
    }

    /// Whether an address may be reached: allow-listed, or public.
    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allowed_networks.iter().any(|n| n.contains(&ip)) || is_public(ip)
    }
}

/// Unwraps IPv4 addresses hidden in IPv6 forms (mapped, compatible, NAT64, 6to4).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            // IPv4-compatible ::a.b.c.d (deprecated) and NAT64 64:ff9b::a.b.c.d.
            if s[..6] == [0, 0, 0, 0, 0, 0] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            // 6to4 2002:a.b.c.d::/48.
            if s[0] == 0x2002 {
                let [a, b] = s[1].to_be_bytes();
                let [c, d] = s[2].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // includes 169.254.169.254, the cloud metadata service
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link local
        || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])) // discard-only
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(vec![25, 465, 587, 2525], vec![])
    }

    #[test]
    fn refuses_private_and_odd_forms() {
        let g = guard();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "::7f00:1",
        ] {
            assert!(!g.is_allowed(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "::ffff:93.184.216.34"] {
            assert!(g.is_allowed(ip.parse().unwrap()), "{ip} must be allowed");
        }
    }

    #[test]
    fn allow_list_and_ports() {
        let g = Guard::new(vec![2525], vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(g.is_allowed("127.0.0.1".parse().unwrap()));
        assert!(g.is_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(g.check_port(2525).is_ok());
        assert!(matches!(
            g.check_port(22),
            Err(GuardError::PortNotAllowed(22, _))
        ));
    }

    #[tokio::test]
    async fn resolve_refuses_uniformly() {
        let g = guard();
        assert_eq!(g.resolve("127.0.0.1", 25).await, Err(GuardError::Refused));
        assert_eq!(g.resolve("localhost", 25).await, Err(GuardError::Refused));
    }
}
