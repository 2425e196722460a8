//! Task ids: `UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:`,
//! hex upper-case, with the trailing colon; the id may be empty and the user
//! of a token-started task is the whole `user@realm!token`.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upid {
    pub node: String,
    pub pid: u32,
    pub pstart: u64,
    pub starttime: u64,
    pub kind: String,
    pub id: String,
    pub user: String,
}

impl FromStr for Upid {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unable to parse worker upid {s:?}");
        let body = s
            .strip_prefix("UPID:")
            .and_then(|b| b.strip_suffix(':'))
            .ok_or_else(bad)?;
        let parts: Vec<&str> = body.splitn(7, ':').collect();
        let [node, pid, pstart, starttime, kind, id, user] = parts[..] else {
            return Err(bad());
        };
        let node_ok = !node.is_empty()
            && node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !node.starts_with('-')
            && !node.ends_with('-');
        if !node_ok
            || kind.is_empty()
            || kind.contains(['/', ' '])
            || user.is_empty()
            || !(8..=9).contains(&pstart.len())
        {
            return Err(bad());
        }
        Ok(Upid {
            node: node.to_owned(),
            pid: u32::from_str_radix(pid, 16).map_err(|_| bad())?,
            pstart: u64::from_str_radix(pstart, 16).map_err(|_| bad())?,
            starttime: u64::from_str_radix(starttime, 16).map_err(|_| bad())?,
            kind: kind.to_owned(),
            id: id.to_owned(),
            user: user.to_owned(),
        })
    }
}

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UPID:{}:{:08X}:{:08X}:{:08X}:{}:{}:{}:",
            self.node, self.pid, self.pstart, self.starttime, self.kind, self.id, self.user
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_real_upids() {
        for s in [
            "UPID:pve:00000AC5:0000CCB6:5FBE5E63:qmclone:100:root@pam:",
            "UPID:server5:001A2B3C:12345678A:6612C0DE:qmstart:105:root@pam!api:",
            "UPID:pve:00001234:00ABCDEF:5FBE5E63:imgcopy::root@pam:",
        ] {
            let u: Upid = s.parse().unwrap();
            assert_eq!(u.to_string(), s);
        }
        let u: Upid = "UPID:pve:00000AC5:0000CCB6:5FBE5E63:qmclone:100:root@pam:"
            .parse()
            .unwrap();
        assert_eq!(
            (u.kind.as_str(), u.id.as_str(), u.pid),
            ("qmclone", "100", 0xAC5)
        );
        assert!(
            "UPID:pve:1:2:3:x:y:root@pam".parse::<Upid>().is_err(),
            "needs the trailing colon"
        );
        assert!("nonsense".parse::<Upid>().is_err());
    }
}
