//! Who is calling. On the unix socket the kernel says (SO_PEERCRED); on TCP a bearer token
//! maps to a user (tokens are stored hashed); TCP without a token reads only.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{Config, hash_token};
use crate::spec::{Caller, Owner};

/// The peer of a unix-socket connection.
#[derive(Debug, Clone, Copy)]
pub struct UnixPeer {
    pub uid: Option<u32>,
}

impl UnixPeer {
    /// The peer of an accepted unix-socket connection, as the kernel reports it.
    pub fn of(stream: &tokio::net::UnixStream) -> Self {
        UnixPeer {
            uid: stream.peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// The rules that turn a peer or token into a [`Caller`].
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    tokens: BTreeMap<String, String>,
    admins: BTreeSet<String>,
    trusted: BTreeSet<String>,
    daemon_uid: u32,
    daemon_user: String,
    root: bool,
    pub anonymous_read: bool,
    pub public_logs: bool,
}

impl AuthPolicy {
    pub fn from_config(cfg: &Config) -> Self {
        let uid = nix::unistd::geteuid();
        let daemon_user = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map_or_else(|| uid.to_string(), |u| u.name);
        AuthPolicy {
            tokens: cfg.tokens.clone(),
            admins: cfg.admins.clone(),
            trusted: cfg.trusted_users.clone(),
            daemon_uid: uid.as_raw(),
            daemon_user,
            root: uid.is_root(),
            anonymous_read: cfg.anonymous_read,
            public_logs: cfg.public_logs,
        }
    }

    /// The caller behind a unix-socket peer uid.
    pub fn for_uid(&self, uid: Option<u32>) -> Caller {
        let Some(uid) = uid else {
            return Caller::anonymous();
        };
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        let user = name.clone().unwrap_or_else(|| format!("uid{uid}"));
        let admin =
            uid == 0 || (!self.root && uid == self.daemon_uid) || self.admins.contains(&user);
        let can_submit = if self.root {
            name.is_some()
        } else {
            uid == self.daemon_uid || self.trusted.contains(&user)
        };
        Caller {
            user: Some(user),
            uid: Some(uid),
            admin,
            can_submit,
        }
    }

    /// The caller a bearer token stands for; `None` if the token is unknown.
    pub fn for_token(&self, token: &str) -> Option<Caller> {
        let user = self.tokens.get(&hash_token(token))?.clone();
        let uid = nix::unistd::User::from_name(&user)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw());
        let admin = user == "root"
            || self.admins.contains(&user)
            || (!self.root && user == self.daemon_user);
        let can_submit = if self.root {
            uid.is_some()
        } else {
            user == self.daemon_user || self.trusted.contains(&user)
        };
        Some(Caller {
            user: Some(user),
            uid,
            admin,
            can_submit,
        })
    }

    /// The owner a submitted job gets.
    pub fn owner_for(&self, caller: &Caller) -> Option<Owner> {
        let user = caller.user.clone()?;
        Some(Owner {
            user,
            uid: caller.uid.unwrap_or(self.daemon_uid),
        })
    }

    /// May `caller` read the logs of a job owned by `owner`?
    pub fn may_read_logs(&self, caller: &Caller, owner: &str) -> bool {
        self.public_logs || caller.may_change(owner)
    }
}

impl Caller {
    /// A TCP caller without a token: may read the queue, change nothing.
    pub fn anonymous() -> Caller {
        Caller {
            user: None,
            uid: None,
            admin: false,
            can_submit: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(root: bool) -> AuthPolicy {
        AuthPolicy {
            tokens: [
                (hash_token("t-alice"), "alice".to_string()),
                (hash_token("t-bob"), "bob".to_string()),
            ]
            .into(),
            admins: ["alice".to_string()].into(),
            trusted: ["bob".to_string()].into(),
            daemon_uid: 4242,
            daemon_user: "svc".into(),
            root,
            anonymous_read: true,
            public_logs: false,
        }
    }

    #[test]
    fn unprivileged_daemon_accepts_itself_and_trusted_users_only() {
        let p = policy(false);
        // The daemon's own uid: may submit and is an admin of its own daemon.
        let me = p.for_uid(Some(4242));
        assert!(me.can_submit && me.admin);
        // A stranger (uid 0 is root: always admin, but not trusted to submit here).
        let stranger = p.for_uid(Some(54321));
        assert!(!stranger.can_submit && !stranger.admin);
        // Token users: bob is trusted, alice is an admin but not trusted to submit.
        let bob = p.for_token("t-bob").unwrap();
        assert!(bob.can_submit && !bob.admin);
        let alice = p.for_token("t-alice").unwrap();
        assert!(alice.admin && !alice.can_submit);
        assert!(p.for_token("nope").is_none());
    }

    #[test]
    fn root_daemon_accepts_users_with_accounts() {
        let p = policy(true);
        // uid 0 always has an account; a uid without a passwd entry cannot own jobs.
        assert!(p.for_uid(Some(0)).can_submit);
        assert!(!p.for_uid(Some(3_999_999)).can_submit);
        // "nobody" exists on every Debian machine; "bob" does not here.
        assert!(
            !p.for_token("t-bob").unwrap().can_submit,
            "a token user needs a Unix account"
        );
        let anon = p.for_uid(None);
        assert!(anon.user.is_none() && !anon.can_submit);
    }

    #[test]
    fn only_owners_and_admins_change_jobs() {
        let p = policy(false);
        let bob = p.for_token("t-bob").unwrap();
        assert!(bob.may_change("bob") && !bob.may_change("carol"));
        assert!(p.for_token("t-alice").unwrap().may_change("carol"));
        assert!(!p.may_read_logs(&bob, "carol") && p.may_read_logs(&bob, "bob"));
    }
}
