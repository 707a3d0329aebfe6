//! Image definitions: a base and chained steps, validated, with content-addressed layer ids.
//!
//! A definition is a value: `base` plus steps in order. Every step's result is a *layer*: a
//! whole ext4 image whose id is derived from its parent layer's id and the step's canonical
//! JSON ([`layer_id`]), so the id of the last layer, the image id, covers the base and every
//! step, including the bytes of added files (an added file enters as the BLAKE3 of the tar
//! the client uploaded, [`Step::AddFiles::context`]). An unchanged definition therefore
//! names layers that exist; changing step k changes the ids of step k and every later one,
//! and nothing before it.
//!
//! The wire and file forms of a step are externally tagged JSON, e.g.
//! `{"apt_install": ["curl"]}`, `{"env": {"A": "1"}}`,
//! `{"add_files": {"remote": "/app", "context": "<64 hex>"}}` (the CLI and SDK turn
//! `add_local_file` / `add_local_dir` into `add_files` after uploading the tar; see
//! [`super::context`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Result, SailboxError};

/// Steps in one definition, at most.
pub const MAX_STEPS: usize = 128;
/// Items (packages, commands, variables) in one step, at most.
pub const MAX_ITEMS: usize = 1024;
/// Bytes of one item (a package spec, a command, a variable's value), at most.
pub const MAX_ITEM_BYTES: usize = 16 << 10;
/// The Python version of the Debian base (bookworm's python3).
pub const BASE_PYTHON: &str = "3.11";

/// One build step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// `apt-get install` of Debian packages (names, optionally `=version`).
    AptInstall(Vec<String>),
    /// `pip install` of Python requirement specifiers (pip itself is installed first when the
    /// image lacks it).
    PipInstall(Vec<String>),
    /// Shell commands, run in order with `/bin/sh -c`; the first failure fails the step.
    RunCommands(Vec<String>),
    /// Environment variables for later steps and for every exec in a sailbox of the image.
    Env(BTreeMap<String, String>),
    /// The entries of an uploaded tar, extracted under `remote` (owners and modes kept).
    AddFiles {
        /// Absolute directory in the image.
        remote: String,
        /// BLAKE3 (hex) of the tar, as `UploadContext` returned it.
        context: String,
    },
}

impl Step {
    /// A one-line description for logs and errors.
    pub fn describe(&self) -> String {
        let list = |name: &str, items: &[String]| {
            let mut s = format!("{name}({})", items.join(", "));
            if s.len() > 200 {
                let mut cut = 197;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
                s.push_str("...");
            }
            s
        };
        match self {
            Self::AptInstall(p) => list("apt_install", p),
            Self::PipInstall(p) => list("pip_install", p),
            Self::RunCommands(c) => list("run_commands", c),
            Self::Env(vars) => list("env", &vars.keys().cloned().collect::<Vec<_>>()),
            Self::AddFiles { remote, context } => format!("add_files({remote} <- {})", context.get(..12).unwrap_or(context)),
        }
    }

    /// The canonical encoding hashed into the layer id.
    fn canonical(&self) -> String {
        // serde_json of a BTreeMap-based value is deterministic.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A validated image definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageDefinition {
    /// The base image: `debian_amd64` (or `debian`, the same).
    pub base: String,
    /// The Python version asked for, if any (must be what the base provides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python_version: Option<String>,
    /// The steps, in order.
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// The stored image a base name stands for on this host ("debian" is built with debootstrap).
pub fn base_image(base: &str) -> Result<&'static str> {
    match base {
        "debian" | "debian_amd64" | "debian_slim" => Ok("debian"),
        "debian_arm64" | "debian_aarch64" => Err(SailboxError::ImageDefinition(format!(
            "base {base:?} is an arm64 image and this host runs x86_64 guests only: use \"debian_amd64\""
        ))),
        _ => Err(SailboxError::ImageDefinition(format!("unknown base image {base:?}: use \"debian_amd64\""))),
    }
}

impl ImageDefinition {
    /// Checks every bound and name; returns the stored base image name.
    pub fn validate(&self) -> Result<&'static str> {
        let bad = |m: String| Err(SailboxError::ImageDefinition(m));
        let base = base_image(&self.base)?;
        if let Some(v) = &self.python_version
            && v != BASE_PYTHON
            && v != "3"
        {
            return bad(format!("python_version {v:?} is not available: the Debian base provides Python {BASE_PYTHON}"));
        }
        if self.steps.len() > MAX_STEPS {
            return bad(format!("{} steps; at most {MAX_STEPS}", self.steps.len()));
        }
        for (i, step) in self.steps.iter().enumerate() {
            let n = i + 1;
            let items: Vec<&String> = match step {
                Step::AptInstall(p) | Step::PipInstall(p) | Step::RunCommands(p) => p.iter().collect(),
                Step::Env(vars) => vars.iter().flat_map(|(k, v)| [k, v]).collect(),
                Step::AddFiles { remote, context } => vec![remote, context],
            };
            if items.is_empty() {
                return bad(format!("step {n} ({}) is empty", step.describe()));
            }
            if items.len() > MAX_ITEMS {
                return bad(format!("step {n} has {} items; at most {MAX_ITEMS}", items.len()));
            }
            for item in &items {
                if item.len() > MAX_ITEM_BYTES || item.contains('\0') {
                    return bad(format!("step {n}: an item is longer than {MAX_ITEM_BYTES} bytes or holds a NUL"));
                }
            }
            match step {
                Step::AptInstall(pkgs) => {
                    for p in pkgs {
                        let ok = p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                            && p.chars().all(|c| c.is_ascii_alphanumeric() || "+-.:=~_".contains(c));
                        if !ok {
                            return bad(format!("step {n}: {p:?} is not a Debian package name (name or name=version)"));
                        }
                    }
                }
                Step::PipInstall(pkgs) => {
                    for p in pkgs {
                        if p.starts_with('-') || p.trim().is_empty() || p.contains(['\n', '\r']) {
                            return bad(format!("step {n}: {p:?} is not a requirement specifier (options are not accepted)"));
                        }
                    }
                }
                Step::RunCommands(cmds) => {
                    if cmds.iter().any(|c| c.trim().is_empty()) {
                        return bad(format!("step {n}: an empty command"));
                    }
                }
                Step::Env(vars) => {
                    for (k, v) in vars {
                        let ok = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                        if !ok {
                            return bad(format!("step {n}: {k:?} is not an environment variable name"));
                        }
                        if v.contains(['\n', '\r']) {
                            return bad(format!("step {n}: the value of {k} holds a line break"));
                        }
                    }
                }
                Step::AddFiles { remote, context } => {
                    check_remote(n, remote)?;
                    if context.len() != 64 || !context.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                        return bad(format!("step {n}: context {context:?} is not a BLAKE3 hex digest"));
                    }
                }
            }
        }
        Ok(base)
    }

    /// The environment in force after each step (`env` steps accumulate).
    pub fn env_after(&self, steps: usize) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for step in self.steps.iter().take(steps) {
            if let Step::Env(vars) = step {
                env.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        env
    }

    /// The id of every layer, given the id of the base image: element k is the image after
    /// step k+1; the last one is the image id (the base's id when there are no steps).
    pub fn layer_ids(&self, base_id: &str) -> Vec<String> {
        let mut ids = Vec::with_capacity(self.steps.len());
        let mut parent = base_id.to_owned();
        for step in &self.steps {
            parent = layer_id(&parent, step);
            ids.push(parent.clone());
        }
        ids
    }
}

fn check_remote(n: usize, remote: &str) -> Result<()> {
    let ok = remote.starts_with('/')
        && remote.len() <= 4096
        && remote.split('/').all(|c| c != ".." && c != ".")
        && !remote.contains("//");
    if ok {
        Ok(())
    } else {
        Err(SailboxError::ImageDefinition(format!(
            "step {n}: remote path {remote:?} must be absolute, normalised (no `.`, `..` or `//`)"
        )))
    }
}

impl TryFrom<proto::sailbox::ImageDefinition> for ImageDefinition {
    type Error = SailboxError;

    /// The wire form, validated.
    fn try_from(d: proto::sailbox::ImageDefinition) -> Result<Self> {
        use proto::sailbox::image_step::Step as W;
        let steps = d
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, s)| match s.step {
                Some(W::AptInstall(l)) => Ok(Step::AptInstall(l.items)),
                Some(W::PipInstall(l)) => Ok(Step::PipInstall(l.items)),
                Some(W::RunCommands(l)) => Ok(Step::RunCommands(l.items)),
                Some(W::Env(e)) => Ok(Step::Env(e.vars.into_iter().collect())),
                Some(W::AddFiles(a)) => Ok(Step::AddFiles { remote: a.remote, context: a.context }),
                None => Err(SailboxError::ImageDefinition(format!("step {} has no kind", i + 1))),
            })
            .collect::<Result<Vec<_>>>()?;
        let def = Self { base: d.base, python_version: (!d.python_version.is_empty()).then_some(d.python_version), steps };
        def.validate()?;
        Ok(def)
    }
}

impl From<&ImageDefinition> for proto::sailbox::ImageDefinition {
    fn from(d: &ImageDefinition) -> Self {
        use proto::sailbox as pb;
        use proto::sailbox::image_step::Step as W;
        let list = |items: &Vec<String>| pb::StringList { items: items.clone() };
        Self {
            base: d.base.clone(),
            python_version: d.python_version.clone().unwrap_or_default(),
            steps: d
                .steps
                .iter()
                .map(|s| pb::ImageStep {
                    step: Some(match s {
                        Step::AptInstall(p) => W::AptInstall(list(p)),
                        Step::PipInstall(p) => W::PipInstall(list(p)),
                        Step::RunCommands(c) => W::RunCommands(list(c)),
                        Step::Env(v) => W::Env(pb::EnvVars { vars: v.clone().into_iter().collect() }),
                        Step::AddFiles { remote, context } => {
                            W::AddFiles(pb::AddFiles { remote: remote.clone(), context: context.clone() })
                        }
                    }),
                })
                .collect(),
        }
    }
}

/// The id of the layer that `step` makes on top of `parent`.
pub fn layer_id(parent: &str, step: &Step) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"sail image layer v1\n");
    h.update(parent.as_bytes());
    h.update(b"\n");
    h.update(step.canonical().as_bytes());
    format!("im-{}", &h.finalize().to_hex()[..24])
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Step {
    /// The shell script that performs the step inside the build sandbox (`add_files` reads
    /// the tar on standard input).
    pub fn script(&self, env: &BTreeMap<String, String>) -> String {
        let words = |items: &[String]| items.iter().map(|s| shell_quote(s)).collect::<Vec<_>>().join(" ");
        match self {
            Self::AptInstall(pkgs) => format!(
                "export DEBIAN_FRONTEND=noninteractive\n\
                 apt-get update -q\n\
                 apt-get install -y -q --no-install-recommends {}\n\
                 apt-get clean\n\
                 rm -rf /var/lib/apt/lists/*\n",
                words(pkgs)
            ),
            Self::PipInstall(pkgs) => format!(
                "if ! python3 -m pip --version >/dev/null 2>&1; then\n\
                 \x20 export DEBIAN_FRONTEND=noninteractive\n\
                 \x20 apt-get update -q && apt-get install -y -q --no-install-recommends python3-pip\n\
                 \x20 apt-get clean; rm -rf /var/lib/apt/lists/*\n\
                 fi\n\
                 python3 -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
                 --break-system-packages {}\n",
                words(pkgs)
            ),
            Self::RunCommands(cmds) => cmds.iter().map(|c| format!("/bin/sh -c {}\n", shell_quote(c))).collect::<String>(),
            Self::Env(_) => {
                // The whole environment so far, for the agent to apply to every exec.
                let mut s = String::from("mkdir -p /etc/sail\n: > /etc/sail/image.env.tmp\n");
                for (k, v) in env {
                    s.push_str(&format!("printf '%s\\n' {} >> /etc/sail/image.env.tmp\n", shell_quote(&format!("{k}={v}"))));
                }
                s.push_str("mv /etc/sail/image.env.tmp /etc/sail/image.env\n");
                s
            }
            Self::AddFiles { remote, .. } => {
                format!("mkdir -p {r}\ntar -x -p --same-owner -f - -C {r}\n", r = shell_quote(remote))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(steps: Vec<Step>) -> ImageDefinition {
        ImageDefinition { base: "debian_amd64".into(), python_version: None, steps }
    }

    #[test]
    fn the_json_form_reads_and_writes_the_documented_schema() {
        let text = r#"{"base": "debian_amd64", "python_version": "3.11", "steps": [
            {"apt_install": ["hello"]}, {"pip_install": ["six==1.16.0"]},
            {"run_commands": ["echo hi > /hi"]}, {"env": {"B": "2", "A": "1"}},
            {"add_files": {"remote": "/app", "context": "00000000000000000000000000000000000000000000000000000000000000aa"}}]}"#;
        let d: ImageDefinition = serde_json::from_str(text).unwrap();
        assert_eq!(d.validate().unwrap(), "debian");
        assert_eq!(d.steps.len(), 5);
        assert_eq!(d.env_after(5).into_iter().collect::<Vec<_>>(), [("A".into(), "1".into()), ("B".into(), "2".into())]);
        let again: ImageDefinition = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(again, d);
        assert!(serde_json::from_str::<ImageDefinition>(r#"{"base": "debian", "steps": [{"apt": ["x"]}]}"#).is_err());
    }

    #[test]
    fn a_change_at_step_k_changes_ids_from_k_on_only() {
        let a = def(vec![
            Step::AptInstall(vec!["hello".into()]),
            Step::RunCommands(vec!["true".into()]),
            Step::Env([("A".to_owned(), "1".to_owned())].into()),
        ]);
        let mut b = a.clone();
        b.steps[1] = Step::RunCommands(vec!["false".into()]);
        let (ia, ib) = (a.layer_ids("im-base"), b.layer_ids("im-base"));
        assert_eq!(ia[0], ib[0]);
        assert_ne!(ia[1], ib[1]);
        assert_ne!(ia[2], ib[2]);
        assert_eq!(a.layer_ids("im-base"), ia, "ids are deterministic");
        assert_ne!(a.layer_ids("im-other")[0], ia[0], "the base is part of every id");
        // A one-byte change in an added file is a different context hash.
        let add = |c: &str| def(vec![Step::AddFiles { remote: "/app".into(), context: c.repeat(64) }]);
        assert_ne!(add("a").layer_ids("im-base"), add("b").layer_ids("im-base"));
    }

    #[test]
    fn bad_definitions_are_refused_with_the_reason() {
        let cases: Vec<(ImageDefinition, &str)> = vec![
            (ImageDefinition { base: "alpine".into(), python_version: None, steps: vec![] }, "unknown base"),
            (ImageDefinition { base: "debian_arm64".into(), python_version: None, steps: vec![] }, "arm64"),
            (ImageDefinition { base: "debian".into(), python_version: Some("3.8".into()), steps: vec![] }, "not available"),
            (def(vec![Step::AptInstall(vec!["curl; rm -rf /".into()])]), "not a Debian package"),
            (def(vec![Step::AptInstall(vec![])]), "empty"),
            (def(vec![Step::PipInstall(vec!["--index-url=http://x".into()])]), "options are not accepted"),
            (def(vec![Step::RunCommands(vec![" ".into()])]), "empty command"),
            (def(vec![Step::Env([("1A".to_owned(), "x".to_owned())].into())]), "not an environment variable"),
            (def(vec![Step::AddFiles { remote: "app".into(), context: "a".repeat(64) }]), "absolute"),
            (def(vec![Step::AddFiles { remote: "/a/../etc".into(), context: "a".repeat(64) }]), "normalised"),
            (def(vec![Step::AddFiles { remote: "/app".into(), context: "xyz".into() }]), "BLAKE3"),
            (def(vec![Step::RunCommands(vec!["true".into()]); MAX_STEPS + 1]), "at most"),
        ];
        for (d, want) in cases {
            let e = d.validate().unwrap_err();
            assert!(matches!(e, SailboxError::ImageDefinition(_)), "{e}");
            assert!(e.to_string().contains(want), "{e} lacks {want:?}");
        }
    }

    #[test]
    fn scripts_quote_every_word() {
        let s = Step::RunCommands(vec!["echo 'a b' > /x".into()]).script(&BTreeMap::new());
        assert_eq!(s, "/bin/sh -c 'echo '\\''a b'\\'' > /x'\n");
        let env = [("K".to_owned(), "v 'q'".to_owned())].into();
        assert!(Step::Env(BTreeMap::new()).script(&env).contains("'K=v '\\''q'\\'''"));
    }
}
