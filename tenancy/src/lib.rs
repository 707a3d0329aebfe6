//! Who is calling: API keys, the org each belongs to, and the role it has.
//!
//! Every call to a sail service (volumed's `sail.volume.v1` and `sail.tenancy.v1`, vmm-host's
//! `sail.sailbox.v1`) carries an API key in its `authorization` metadata. A key belongs to one
//! org and has one [`Role`]; the services scope every object to the caller's org, so another
//! org's volume, sailbox, image or checkpoint behaves exactly like one that does not exist.
//!
//! - [`ApiKey`]: the key format (`sail_<16 hex id>_<64 hex secret>`) and the hash stored in
//!   place of the secret.
//! - [`Identity`]: what a checked key resolves to, and [`Identity::scope`], the one rule for
//!   which org a request acts in.
//! - [`credentials`]: where clients find their key (`SAIL_API_KEY`, else the file `sail up`
//!   wrote for the endpoint).
//! - [`client`]: the interceptor that sends the key on every call.
//! - `server` (feature `server`): the tower layer that checks the key before any handler runs,
//!   and the authenticator that asks volumed (for a vmm-host on its own).
//!
//! ```
//! use tenancy::{ApiKey, Identity, Role};
//! let key = ApiKey::generate();
//! let parsed: ApiKey = key.to_string().parse().unwrap();
//! assert_eq!(parsed.id(), key.id());
//! assert!(parsed.hash() == key.hash());
//!
//! let member = Identity { org: "acme".into(), role: Role::Member, key_id: key.id().into() };
//! assert_eq!(member.scope("").unwrap(), "acme");      // empty: the key's own org
//! assert_eq!(member.scope("acme").unwrap(), "acme");
//! assert!(member.scope("globex").is_err());            // never another org
//! ```

pub mod client;
pub mod credentials;
mod key;
#[cfg(feature = "server")]
pub mod server;

pub use key::{ApiKey, KeyError, KeyHash, valid_id};

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Uses everything of its org; cannot manage keys.
    Member,
    /// A member that also creates, lists and revokes its org's keys.
    Admin,
    /// The engine's own services and the deployment's operator: acts for any org it names.
    Operator,
}

impl Role {
    /// The wire form.
    pub fn to_proto(self) -> proto::tenancy::Role {
        match self {
            Role::Member => proto::tenancy::Role::Member,
            Role::Admin => proto::tenancy::Role::Admin,
            Role::Operator => proto::tenancy::Role::Operator,
        }
    }

    /// From the wire form (unspecified is a member).
    pub fn from_proto(r: i32) -> Option<Role> {
        match proto::tenancy::Role::try_from(r).ok()? {
            proto::tenancy::Role::Unspecified | proto::tenancy::Role::Member => Some(Role::Member),
            proto::tenancy::Role::Admin => Some(Role::Admin),
            proto::tenancy::Role::Operator => Some(Role::Operator),
        }
    }

    /// "member", "admin" or "operator".
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Operator => "operator",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "member" => Ok(Role::Member),
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            other => Err(format!("unknown role {other:?} (member, admin or operator)")),
        }
    }
}

/// The caller of a request, once its key has been checked. Handlers find it in the request's
/// extensions (the server layer puts it there; see [`Identity::of`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The key's org.
    pub org: String,
    /// The key's role.
    pub role: Role,
    /// The key's id (for logs and audit; never the secret).
    pub key_id: String,
}

/// Statuses are built with the contract's error detail, like every sail error.
fn status(code: tonic::Code, name: &str, message: impl Into<String>) -> tonic::Status {
    proto::ErrorDetail::to_status(code, name, message)
}

/// The status of a call without a valid key (contract name `SailAuthenticationError`).
pub fn unauthenticated(message: impl Into<String>) -> tonic::Status {
    status(tonic::Code::Unauthenticated, "SailAuthenticationError", message)
}

/// The status of a call its key may not make (contract name `SailPermissionDeniedError`).
pub fn permission_denied(message: impl Into<String>) -> tonic::Status {
    status(tonic::Code::PermissionDenied, "SailPermissionDeniedError", message)
}

impl Identity {
    /// The caller of `req`: the identity the server layer attached. A request that reached a
    /// handler without one (a service served without the layer) is refused, never served as
    /// anyone.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Identity, tonic::Status> {
        req.extensions().get::<Identity>().cloned().ok_or_else(|| unauthenticated("this call carries no checked API key"))
    }

    /// The org a request acts in, given the org it names (`requested`, often empty):
    /// a member's or admin's own org (naming another is refused, whether or not that org
    /// exists, so the answer says nothing about it); an operator's the one it names.
    pub fn scope(&self, requested: &str) -> Result<String, tonic::Status> {
        match self.role {
            Role::Operator if requested.is_empty() => Err(status(
                tonic::Code::InvalidArgument,
                "SailError",
                "an operator key acts for the org it names: this request names none",
            )),
            Role::Operator => Ok(requested.to_owned()),
            _ if requested.is_empty() || requested == self.org => Ok(self.org.clone()),
            _ => {
                Err(permission_denied(format!("this API key belongs to org {:?}; it cannot act for org {requested:?}", self.org)))
            }
        }
    }

    /// Whether this caller may act in `org` (objects of other orgs are "not found" to it).
    pub fn sees(&self, org: &str) -> bool {
        self.role == Role::Operator || self.org == org
    }

    /// Refuses a call that needs the admin (or operator) role.
    pub fn require_admin(&self) -> Result<(), tonic::Status> {
        match self.role {
            Role::Admin | Role::Operator => Ok(()),
            Role::Member => Err(permission_denied("managing API keys needs an admin key")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: Role) -> Identity {
        Identity { org: "acme".into(), role, key_id: "0123456789abcdef".into() }
    }

    #[test]
    fn members_and_admins_act_only_in_their_org() {
        for role in [Role::Member, Role::Admin] {
            assert_eq!(who(role).scope("").unwrap(), "acme");
            assert_eq!(who(role).scope("acme").unwrap(), "acme");
            let e = who(role).scope("globex").unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert_eq!(proto::error_name(&e).as_deref(), Some("SailPermissionDeniedError"));
            assert!(who(role).sees("acme") && !who(role).sees("globex"));
        }
    }

    #[test]
    fn operators_name_the_org_they_act_for() {
        assert_eq!(who(Role::Operator).scope("globex").unwrap(), "globex");
        assert_eq!(who(Role::Operator).scope("").unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(who(Role::Operator).sees("globex"));
    }

    #[test]
    fn only_admins_and_operators_manage_keys() {
        assert!(who(Role::Member).require_admin().is_err());
        assert!(who(Role::Admin).require_admin().is_ok());
        assert!(who(Role::Operator).require_admin().is_ok());
    }

    #[test]
    fn roles_round_trip() {
        for r in [Role::Member, Role::Admin, Role::Operator] {
            assert_eq!(Role::from_proto(r.to_proto() as i32), Some(r));
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert_eq!(Role::from_proto(0), Some(Role::Member));
        assert_eq!(Role::from_proto(99), None);
    }

    #[test]
    fn a_request_without_an_identity_is_refused() {
        let req = tonic::Request::new(());
        assert_eq!(Identity::of(&req).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut req = tonic::Request::new(());
        req.extensions_mut().insert(who(Role::Member));
        assert_eq!(Identity::of(&req).unwrap(), who(Role::Member));
    }
}
