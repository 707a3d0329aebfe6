//! The examples shown under each command's `--help` (docs/cli.md lists the same ones, and
//! `cli/tests` runs them).

pub(crate) const SAIL: &str = "\
Examples:
  sail up                                   # run the services here (another terminal)
  sail volume create ws && sail volume put ws ./src
  sail box create --image minimal           # prints the sailbox id
  sail box exec sb-... -- ls -la \"/srv/a b\"

Exit codes: 0 success, 1 server or transport error (or the service is not running),
2 user error; `box exec` and `box wait` exit with the command's own code.";

pub(crate) const UP: &str = "\
Example:
  sail up --data-dir /var/lib/sail --listen 127.0.0.1:7420";

pub(crate) const DOCTOR: &str = "\
Example:
  sail doctor --json";

pub(crate) const COMPLETIONS: &str = "\
Examples:
  sail completions bash > /etc/bash_completion.d/sail
  sail completions zsh > \"${fpath[1]}/_sail\"
  sail completions fish > ~/.config/fish/completions/sail.fish";

pub(crate) const VOLUME: &str = "\
Example:
  sail volume create ws && sail volume put ws ./src --dest app && sail volume list ws app";

pub(crate) const VOLUME_CREATE: &str = "\
Example:
  sail volume create ws";

pub(crate) const VOLUME_LS: &str = "\
Example:
  sail volume ls --json";

pub(crate) const VOLUME_RM: &str = "\
Example:
  sail volume rm ws";

pub(crate) const VOLUME_LOG: &str = "\
Example:
  sail volume log ws --limit 5";

pub(crate) const VOLUME_PUT: &str = "\
Example:
  sail volume put ws ./src README.md --dest app   # one commit; prints its id with --quiet";

pub(crate) const VOLUME_CAT: &str = "\
Example:
  sail volume cat ws app/README.md > README.md";

pub(crate) const VOLUME_LIST: &str = "\
Example:
  sail volume list ws app/src";

pub(crate) const VOLUME_MOUNT: &str = "\
Example:
  sail volume mount ws /mnt/ws --create";

pub(crate) const VOLUME_COMMIT: &str = "\
Example:
  echo hi > /mnt/ws/hello.txt && sail volume commit /mnt/ws";

pub(crate) const VOLUME_RELOAD: &str = "\
Example:
  sail volume reload /mnt/ws";

pub(crate) const VOLUME_STATUS: &str = "\
Example:
  sail volume status /mnt/ws --json";

pub(crate) const VOLUME_UNMOUNT: &str = "\
Example:
  sail volume unmount /mnt/ws";

pub(crate) const BOX: &str = "\
Example:
  id=$(sail box create --image minimal) && sail box exec \"$id\" -- uname -a && sail box terminate \"$id\"";

pub(crate) const BOX_CREATE: &str = "\
Examples:
  sail box create --image minimal --name web --port 8080 --memory-mib 2048
  sail box create --name worker-1 --volume shared-data:/mnt/shared --mint   # mounted before it returns
  sail box create --network none            # no outbound network inside";

pub(crate) const BOX_LS: &str = "\
Example:
  sail box ls --all --json";

pub(crate) const BOX_INFO: &str = "\
Example:
  sail box info sb-... --connect";

pub(crate) const BOX_LISTENERS: &str = "\
Example:
  sail box listeners sb-... --port 8080 --wait 30";

pub(crate) const BOX_EXEC: &str = "\
Words after `--` reach the program as given (quoted for the guest's shell); a single word
after `--` is a shell command line.

Examples:
  sail box exec sb-... -- ls -la \"/srv/a b\"          # two arguments: -la and /srv/a b
  sail box exec sb-... -- sh -c 'echo hi'            # sh gets -c and 'echo hi'
  sail box exec sb-... -- 'make test && echo ok'     # one word: a shell command line
  sail box exec --cwd /srv --timeout 60 sb-... -- ./run.sh
  sail box exec --detach sb-... -- ./long-job.sh     # prints the exec id; `sail box wait` it later";

pub(crate) const BOX_WAIT: &str = "\
Example:
  sail box wait ex-... --timeout 600";

pub(crate) const BOX_WRITE: &str = "\
Example:
  sail box write sb-... /srv/app.tar --mode 600 < app.tar";

pub(crate) const BOX_READ: &str = "\
Example:
  sail box read sb-... /srv/out.log > out.log";

pub(crate) const BOX_TERMINATE: &str = "\
Example:
  sail box terminate sb-...";

pub(crate) const BOX_CHECKPOINT: &str = "\
Example:
  sail box checkpoint sb-...      # prints the checkpoint id (for `sail box restore`)";

pub(crate) const BOX_PAUSE: &str = "\
Example:
  sail box pause sb-... && sail box resume sb-...";

pub(crate) const BOX_SLEEP: &str = "\
Example:
  sail box sleep sb-... --call llm-42 && sail box complete-call sb-... llm-42";

pub(crate) const BOX_RESUME: &str = "\
Example:
  sail box resume sb-...";

pub(crate) const BOX_COMPLETE_CALL: &str = "\
Example:
  sail box complete-call sb-... llm-42";

pub(crate) const BOX_FORK: &str = "\
Example:
  child=$(sail box fork sb-...)";

pub(crate) const BOX_RESTORE: &str = "\
Example:
  sail box restore ck-... --name restored --port 8080";

pub(crate) const BOX_UPGRADE: &str = "\
Example:
  sail box upgrade sb-...";
