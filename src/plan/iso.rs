//! ISO planning: a download for each pinned ISO a planned build needs that
//! is not in its storage yet.

use std::collections::BTreeMap;

use super::address::targeted;
use super::adopt;
use super::{Action, Change, FieldDiff, Impact, PlanError, Planner, Work};
use crate::address::Address;
use crate::desired::{DesiredIso, DesiredNode, IsoPinState, iso_filename};

impl Planner<'_> {
    /// Step 1: the ISOs the planned images (or `--target iso.NAME`) need.
    pub(super) fn isos(&mut self) {
        for node in self.desired.graph.node_weights() {
            let DesiredNode::Iso(iso) = node else {
                continue;
            };
            let address = format!("iso.{}", iso.name);
            let users: Vec<&str> = self
                .fleet
                .images
                .iter()
                .filter(|(_, i)| i.iso == iso.name)
                .map(|(n, _)| n.as_str())
                .collect();
            let needed = users.iter().any(|u| self.images.contains(u));
            // Images on an imported generation get their ISO with their
            // first build, unless it is asked for by name.
            let imported_only =
                !users.is_empty() && users.iter().all(|u| adopt::iso_unneeded(self.desired, u));
            let wanted = self.options.targets.contains(&address)
                || (!imported_only && (needed || targeted(self.options, &address)));
            if !wanted {
                continue;
            }
            match self.iso(iso, &address) {
                Ok(Some(change)) => self.changes.push(change),
                Ok(None) => {}
                Err(e) => self.errors.push(e),
            }
        }
    }

    /// The download of `iso` on its node, if its file is not there.
    fn iso(&self, iso: &DesiredIso, address: &str) -> Result<Option<Change>, PlanError> {
        let place = (iso.node.to_string(), iso.storage.clone());
        if !self.live.storages.contains_key(&place) {
            return Err(PlanError::NoStorage {
                storage: iso.storage.clone(),
                node: iso.node.to_string(),
                address: address.to_owned(),
            });
        }
        let IsoPinState::Pinned { url, sha256 } = &iso.pin else {
            // Pins are resolved before planning; an unresolved one here
            // matters only if a build would need it.
            return Ok(None);
        };
        let filename = iso_filename(url, &sha256.to_string());
        let volid = format!("{}:iso/{filename}", iso.storage);
        let present = self
            .live
            .isos
            .get(&place)
            .is_some_and(|v| v.iter().any(|vol| vol.volid == volid));
        if present {
            return Ok(None);
        }
        let field = |name: &str, value: String| FieldDiff {
            field: name.into(),
            before: None,
            after: Some(value),
            sensitive: false,
        };
        Ok(Some(Change {
            address: Address::iso(&iso.name, iso.node.as_str()),
            action: Action::Create,
            depends_on: Vec::new(),
            fields: vec![field("volume", volid), field("sha256", sha256.to_string())],
            reason: format!("not in storage `{}` on {}", iso.storage, iso.node),
            impact: Impact::None,
            work: Work::DownloadIso {
                node: iso.node.clone(),
                storage: iso.storage.clone(),
                url: url.clone(),
                filename,
                sha256: *sha256,
            },
            unchanged: BTreeMap::new(),
        }))
    }
}
