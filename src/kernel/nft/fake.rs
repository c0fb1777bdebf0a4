//! An in-memory nf_tables for unit tests: interprets a [`Batch`] as the kernel does (all or
//! nothing, ENOENT for what is missing), so fakes of the `Kernel` trait need no real netns.

use std::collections::BTreeMap;

use super::{Batch, Element, Field, NftError, Op, Set, TableRef};

/// One table: rules per chain, elements (key → data) per set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub chains: BTreeMap<String, usize>,
    pub sets: BTreeMap<String, BTreeMap<Vec<Field>, Option<Vec<Field>>>>,
}

/// Every table of a fake netns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub tables: BTreeMap<TableRef, Table>,
}

impl Tables {
    /// Applies `batch` atomically.
    pub fn apply(&mut self, batch: &Batch) -> Result<(), NftError> {
        let mut next = self.clone();
        for op in &batch.ops {
            next.op(op)?;
        }
        *self = next;
        Ok(())
    }

    fn table(&mut self, t: &TableRef, op: &Op) -> Result<&mut Table, NftError> {
        self.tables
            .get_mut(t)
            .ok_or_else(|| NftError::os(libc::ENOENT, op.describe()))
    }

    fn op(&mut self, op: &Op) -> Result<(), NftError> {
        let missing = || NftError::os(libc::ENOENT, op.describe());
        match op {
            Op::AddTable(t) => {
                self.tables.entry(t.clone()).or_default();
            }
            Op::DelTable(t) => {
                self.tables.remove(t).ok_or_else(missing)?;
            }
            Op::AddChain(t, c) => {
                self.table(t, op)?.chains.entry(c.name.clone()).or_insert(0);
            }
            Op::AddSet(t, s) => {
                self.table(t, op)?.sets.entry(s.name.clone()).or_default();
            }
            Op::AddRule(t, r) => {
                *self
                    .table(t, op)?
                    .chains
                    .get_mut(&r.chain)
                    .ok_or_else(missing)? += 1;
            }
            // The same element again is fine; the key with other data is a clash (EEXIST),
            // for an add as for a retirement. A retired element is shown as the kernel has it
            // a clock tick later: gone (or never there).
            Op::AddElements(t, s, es) | Op::RetireElements(t, s, es) => {
                let set = self.table(t, op)?.sets.get_mut(s).ok_or_else(missing)?;
                if es
                    .iter()
                    .any(|e| set.get(&e.key).is_some_and(|d| *d != e.data))
                {
                    return Err(NftError::os(libc::EEXIST, op.describe()));
                }
                for e in es {
                    if matches!(op, Op::AddElements(..)) {
                        set.insert(e.key.clone(), e.data.clone());
                    } else {
                        set.remove(&e.key);
                    }
                }
            }
            Op::DelElements(t, s, es) => {
                let set = self.table(t, op)?.sets.get_mut(s).ok_or_else(missing)?;
                for e in es {
                    set.remove(&e.key).ok_or_else(missing)?;
                }
            }
        }
        Ok(())
    }

    /// What a rule dump of `t` gives (chains with no rules left out, as the kernel does).
    pub fn rule_counts(&self, t: &TableRef) -> Option<BTreeMap<String, usize>> {
        self.tables.get(t).map(|t| {
            t.chains
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| (c.clone(), *n))
                .collect()
        })
    }

    /// What an element dump of `set` gives.
    pub fn elements(&self, t: &TableRef, set: &Set) -> Result<Vec<Element>, NftError> {
        let s = self
            .tables
            .get(t)
            .and_then(|t| t.sets.get(&set.name))
            .ok_or_else(|| NftError::os(libc::ENOENT, format!("list {t} {}", set.name)))?;
        Ok(s.iter()
            .map(|(k, d)| Element {
                key: k.clone(),
                data: d.clone(),
            })
            .collect())
    }

    /// Every element of every table, as `nft list` reads them (`set { key : data }`).
    pub fn all_elements(&self) -> Vec<String> {
        let mut out = Vec::new();
        for t in self.tables.values() {
            for (name, s) in &t.sets {
                for (k, d) in s {
                    let e = Element {
                        key: k.clone(),
                        data: d.clone(),
                    };
                    out.push(format!("{name} {{ {e} }}"));
                }
            }
        }
        out
    }

    /// `nft flush table`: every rule gone, chains, sets and elements kept.
    pub fn flush(&mut self, t: &TableRef) {
        if let Some(t) = self.tables.get_mut(t) {
            t.chains.values_mut().for_each(|n| *n = 0);
        }
    }
}
