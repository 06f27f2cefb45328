//! A shard's index from (project, channel) to the connections listening on it.
//!
//! Owns the lookup that turns an event's channels into candidate connections, and the shard's
//! shared copies: channel and project names, role sets, routes and identities (one allocation
//! per distinct value, shared by every session that holds it). Connections are plain `u32` keys into the shard's slab; this module must not look
//! at connections, sessions or sockets, and is only touched by its own shard thread.

use std::collections::HashSet;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::identity::{Identity, RoleSet};

/// A project and a list of its channels (interned names), one copy per shard for every
/// session whose URL asked for exactly these ([`Registry::intern_route`]).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Route {
    pub project: Arc<str>,
    pub channels: Box<[Arc<str>]>,
    /// The URL named channels, so they are a subscription, even when none of them is left for
    /// this identity (another user's `account.<id>`).
    pub subscribed: bool,
}

#[derive(Debug, Default)]
pub struct Registry {
    /// Project, then channel, to the connections listening. Keys are the interned names, so a
    /// project's name is stored once however many channels it has.
    index: FxHashMap<Arc<str>, FxHashMap<Arc<str>, FxHashSet<u32>>>,
    names: HashSet<Arc<str>>,
    /// Role sets of identities (their extra roles), one copy per distinct set.
    role_sets: HashSet<RoleSet>,
    routes: HashSet<Arc<Route>>,
    /// Identities of signed-in connections, one per distinct user, roles and credential.
    identities: HashSet<Arc<Identity>>,
}

impl Registry {
    /// The shard's shared copy of a name.
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(n.clone());
        n
    }

    /// The shard's shared copy of a set of interned roles.
    pub fn intern_roles(&mut self, roles: &RoleSet) -> RoleSet {
        if let Some(r) = self.role_sets.get(roles) {
            return r.clone();
        }
        self.role_sets.insert(roles.clone());
        roles.clone()
    }

    /// The shard's shared copy of a route (its names interned already).
    pub fn intern_route(&mut self, route: Route) -> Arc<Route> {
        if let Some(r) = self.routes.get(&route) {
            return r.clone();
        }
        let r = Arc::new(route);
        self.routes.insert(r.clone());
        r
    }

    /// The shard's shared copy of an identity equal to `identity` (the same user with the same
    /// roles from the same credential: several tabs or reconnects of one session).
    pub fn share_identity(&mut self, identity: Arc<Identity>) -> Arc<Identity> {
        if let Some(i) = self.identities.get(&identity) {
            return i.clone();
        }
        self.identities.insert(identity.clone());
        identity
    }

    /// Drops interned names, role sets, routes and identities nobody holds any more
    /// (identities, then sets and routes first: they hold names).
    pub fn collect_garbage(&mut self) {
        self.identities.retain(|i| Arc::strong_count(i) > 1);
        self.routes.retain(|r| Arc::strong_count(r) > 1);
        self.role_sets.retain(|r| Arc::strong_count(r) > 1);
        self.names.retain(|n| Arc::strong_count(n) > 1);
    }

    /// Moves `conn` from the channels in `before` to those in `after`, in time linear in their
    /// lengths (a session may hold 10,000 channels).
    pub fn update(&mut self, project: &str, conn: u32, before: &[Arc<str>], after: &[Arc<str>]) {
        let set = |names: &[Arc<str>]| -> FxHashSet<*const u8> {
            // Interned names: equal names are the same allocation. Were they not, a name on both
            // sides would be removed and added back, which ends the same.
            names.iter().map(|n| n.as_ptr()).collect()
        };
        let (in_before, in_after) = match (before.is_empty(), after.is_empty()) {
            (false, false) => (set(before), set(after)),
            _ => (FxHashSet::default(), FxHashSet::default()),
        };
        if let Some(channels) = self.index.get_mut(project) {
            for c in before.iter().filter(|c| !in_after.contains(&c.as_ptr())) {
                if let Some(conns) = channels.get_mut(&**c) {
                    conns.remove(&conn);
                    if conns.is_empty() {
                        channels.remove(&**c);
                    }
                }
            }
            if channels.is_empty() {
                self.index.remove(project);
            }
        }
        let mut added = after
            .iter()
            .filter(|c| !in_before.contains(&c.as_ptr()))
            .peekable();
        if added.peek().is_none() {
            return;
        }
        let project = self.intern(project);
        let channels = self.index.entry(project).or_default();
        for c in added {
            channels.entry(c.clone()).or_default().insert(conn);
        }
    }

    /// Fills `out` with every connection listening on any of `channels` in `project`, each once,
    /// in key order.
    pub fn collect<S: AsRef<str>>(&self, project: &str, channels: &[S], out: &mut Vec<u32>) {
        out.clear();
        let Some(index) = self.index.get(project) else {
            return;
        };
        let mut sets = 0;
        for c in channels {
            if let Some(set) = index.get(c.as_ref()) {
                out.extend(set.iter().copied());
                sets += 1;
            }
        }
        // In key order, not hash order: the shard then walks its slab and writes the sockets
        // roughly in the order they were accepted, which is kinder to caches on both sides
        // (single events to 19,000 subscribers: 8 % less server CPU per message, measured).
        out.sort_unstable();
        if sets > 1 {
            out.dedup();
        }
    }

    /// Number of (project, channel) pairs with at least one listener.
    pub fn channel_count(&self) -> usize {
        self.index.values().map(|channels| channels.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_and_collect() {
        let mut r = Registry::default();
        let a = r.intern("a");
        let b = r.intern("b");
        r.update("p", 1, &[], &[a.clone(), b.clone()]);
        r.update("p", 2, &[], std::slice::from_ref(&b));
        r.update("q", 3, &[], std::slice::from_ref(&a));
        let mut out = Vec::new();
        r.collect("p", &["a", "b"], &mut out);
        assert_eq!(out, vec![1, 2]);
        r.collect("q", &["a", "b"], &mut out);
        assert_eq!(out, vec![3]);
        r.update("p", 1, &[a.clone(), b.clone()], std::slice::from_ref(&b));
        r.collect("p", &["a"], &mut out);
        assert!(out.is_empty());
        r.update("p", 1, std::slice::from_ref(&b), &[]);
        r.update("p", 2, std::slice::from_ref(&b), &[]);
        r.update("q", 3, std::slice::from_ref(&a), &[]);
        assert_eq!(r.channel_count(), 0);
        let p = r.intern("p");
        let route = r.intern_route(Route {
            project: p.clone(),
            channels: Box::new([a.clone()]),
            subscribed: true,
        });
        let again = r.intern_route(Route {
            project: p.clone(),
            channels: Box::new([a.clone()]),
            subscribed: true,
        });
        drop(p);
        assert!(Arc::ptr_eq(&route, &again), "one copy");
        drop((a, b));
        r.collect_garbage();
        assert!(!r.names.is_empty(), "the route holds its names");
        drop((route, again));
        r.collect_garbage();
        assert!(r.names.is_empty() && r.routes.is_empty());
        let first = r.share_identity(Arc::new(Identity::guest()));
        let second = r.share_identity(Arc::new(Identity::guest()));
        assert!(
            Arc::ptr_eq(&first, &second),
            "equal identities are one copy"
        );
        drop((first, second));
        r.collect_garbage();
        assert!(r.identities.is_empty());
    }
}
