//! Durable exec requests. An exec is recorded (with its sailbox's active request) before the
//! agent starts it; a watcher task waits for the agent's result and records it, and every
//! wait reads the record, so a client that went away, or a vmm-host that restarted, can wait
//! on the same id again. One request is active per sailbox at a time.
//!
//! [`Execs`] is the part of a host that runs them: it owns the channels that wake waiters and
//! the watcher tasks; the host wakes a sleeping sailbox before it starts a command here, and
//! the lifecycle fails a sailbox's active request when it ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use proto::agent as apb;
use proto::sailbox as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;

use crate::error::{Result, SailboxError};
use crate::guest_input;
use crate::model::{ExecRecord, ExecStatus, SailboxRecord};
use crate::runtime::{Live, Runtime, Vm};
use sysutil::clock::now_ms;

/// How long the agent may take to start a command.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest command line accepted.
pub const MAX_COMMAND: usize = 64 << 10;

/// The exec requests of a host: starts them, records their results, wakes their waiters.
pub(crate) struct Execs {
    rt: Arc<Runtime>,
    /// Wakes waiters of an exec when its record changes.
    done: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// When finished requests were last pruned (Unix ms).
    pruned_at: std::sync::atomic::AtomicU64,
}

/// How often starting requests prunes old finished ones.
const PRUNE_EVERY_MS: u64 = 3600 * 1000;

impl Execs {
    pub(crate) fn new(rt: Arc<Runtime>) -> Self {
        Self { rt, done: Mutex::default(), pruned_at: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Deletes finished requests that started longer ago than the retention; returns how
    /// many.
    pub(crate) fn prune_old(&self) -> Result<usize> {
        let now = now_ms();
        self.pruned_at.store(now, std::sync::atomic::Ordering::Relaxed);
        let retention = u64::try_from(self.rt.config.exec_retention.as_millis()).unwrap_or(u64::MAX);
        let pruned = self.rt.state.prune_execs(now.saturating_sub(retention))?;
        if pruned > 0 {
            tracing::info!(pruned, "deleted finished exec requests past their retention");
        }
        Ok(pruned)
    }

    /// Prunes when the last pruning is more than [`PRUNE_EVERY_MS`] old.
    fn prune_now_and_then(&self) {
        let last = self.pruned_at.load(std::sync::atomic::Ordering::Relaxed);
        if now_ms().saturating_sub(last) >= PRUNE_EVERY_MS
            && let Err(e) = self.prune_old()
        {
            tracing::warn!(error = %e, "pruning old exec requests failed");
        }
    }

    fn channel(&self, id: &str) -> watch::Receiver<bool> {
        let mut done = self.done.lock();
        done.entry(id.to_owned()).or_insert_with(|| watch::channel(false).0).subscribe()
    }

    fn notify(&self, id: &str) {
        if let Some(tx) = self.done.lock().remove(id) {
            let _ = tx.send(true);
        }
    }

    /// Records a final status for an exec (and clears its sailbox's active request if the
    /// sailbox record is not being rewritten by the caller anyway).
    pub(crate) fn set_status(&self, exec: &ExecRecord, status: ExecStatus) -> Result<()> {
        let mut rec = exec.clone();
        rec.status = status;
        let st = &self.rt.state;
        st.commit(st.changes().exec(st, &rec))?;
        self.notify(&exec.id);
        Ok(())
    }

    /// Fails the sailbox's active exec (it was lost or terminated).
    pub(crate) fn fail_active(&self, sailbox: &SailboxRecord, status: ExecStatus) -> Result<()> {
        let Some(id) = &sailbox.active_exec else { return Ok(()) };
        if let Some(exec) = self.rt.state.exec(id)?
            && exec.status == ExecStatus::Running
        {
            self.set_status(&exec, status)?;
        }
        Ok(())
    }

    /// Resumes watching the exec requests a sailbox had running (after a restart).
    pub(crate) fn watch_running(self: &Arc<Self>, live: &Arc<Live>) -> Result<()> {
        let id = live.id();
        for exec in self.rt.state.running_execs()?.into_iter().filter(|e| e.sailbox == id) {
            self.watch(live, exec.id.clone());
        }
        Ok(())
    }

    /// Starts the task that waits for the agent's result of `id` and records it.
    pub(crate) fn watch(self: &Arc<Self>, live: &Arc<Live>, id: String) {
        let execs = self.clone();
        let watched = live.clone();
        let task = tokio::spawn(async move { execs.wait_for_agent(&watched, &id).await });
        live.push_task(task);
    }

    /// Waits for the agent's result of `id` (across pauses and reconnects) and records it.
    async fn wait_for_agent(&self, live: &Arc<Live>, id: &str) {
        let mut pause = Duration::from_millis(100);
        loop {
            // Paused or sleeping: the command is frozen in the checkpointed guest and goes
            // on when it wakes; wait for a VM.
            let Some(vm) = live.vm() else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let req = apb::WaitExecRequest { request_id: id.to_owned(), ..Default::default() };
            match vm.agent.raw().wait_exec(req).await {
                Ok(resp) => {
                    if let Err(e) = self.record_result(live, id, resp.into_inner()).await {
                        tracing::error!(exec = %id, error = %e, "recording an exec result failed");
                    }
                    return;
                }
                Err(status) if status.code() == tonic::Code::NotFound => {
                    // The agent does not know it: the guest rebooted, or was restored from
                    // a checkpoint taken before the command started (not replayed).
                    let reason =
                        "the guest no longer knows this request (it restarted or was restored from an earlier checkpoint)"
                            .to_owned();
                    if let Ok(Some(exec)) = self.rt.state.exec(id) {
                        let _ = self.finish_exec(live, &exec, ExecStatus::Lost(reason)).await;
                    }
                    return;
                }
                Err(status) => {
                    // The connection broke (VM busy or dying): retry; the VMM watcher
                    // fails the request if the sailbox is lost.
                    tracing::debug!(exec = %id, error = %status, "waiting for the agent failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// The stored result of an exec: what the agent reported, held to the contract's limits
/// (the guest is not trusted to have kept them).
fn result_to_proto(exec: &ExecRecord, r: apb::ExecResult) -> pb::ExecResult {
    let (stdout, stdout_truncated, stdout_bytes) = guest_input::output(r.stdout, r.stdout_truncated, r.stdout_bytes);
    let (stderr, stderr_truncated, stderr_bytes) = guest_input::output(r.stderr, r.stderr_truncated, r.stderr_bytes);
    pb::ExecResult {
        exec_id: exec.id.clone(),
        sailbox_id: exec.sailbox.clone(),
        return_code: r.return_code,
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        stdout_bytes,
        stderr_bytes,
        timed_out: r.timed_out,
        started_unix_ms: r.started_unix_ms,
        finished_unix_ms: r.finished_unix_ms,
        command: exec.command.clone(),
    }
}

fn random_exec_id() -> String {
    format!("ex-{:024x}", rand::random::<u128>() >> 32)
}

/// Checks an exec request's command, working directory and environment.
pub(crate) fn check_request(req: &pb::ExecRequest) -> Result<()> {
    if req.command.trim().is_empty() || req.command.len() > MAX_COMMAND || req.command.contains('\0') {
        return Err(SailboxError::invalid(format!("command must be 1..={MAX_COMMAND} bytes without NUL")));
    }
    if !req.cwd.is_empty() {
        crate::model::check_guest_path(&req.cwd).map_err(SailboxError::InvalidArgument)?;
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(SailboxError::invalid(format!("bad environment variable {k:?}")));
        }
    }
    Ok(())
}

/// The agent's request to start `exec`.
fn start_request(exec: &ExecRecord) -> apb::StartExecRequest {
    apb::StartExecRequest {
        request_id: exec.id.clone(),
        command: exec.command.clone(),
        cwd: exec.cwd.clone(),
        env: exec.env.iter().map(|(k, v)| apb::EnvVar { name: k.clone(), value: v.clone() }).collect(),
        timeout_ms: exec.timeout_ms,
        background: exec.background,
        stdin: Vec::new(),
    }
}

/// What a stream of an exec has sent so far of stdout and stderr.
#[derive(Default)]
struct Sent {
    stdout: u64,
    stderr: u64,
}

impl Execs {
    /// Starts a checked command ([`check_request`]) on a sailbox the caller has woken;
    /// returns its durable exec id.
    pub(crate) async fn start(self: &Arc<Self>, live: &Arc<Live>, req: &pb::ExecRequest) -> Result<pb::ExecHandle> {
        let _op = live.op.lock().await;
        // The state may have changed while waiting for the lock.
        let (live, vm) = self.rt.running(&req.sailbox_id)?;
        let exec = self.record_new(&live, req)?;
        self.prune_now_and_then();
        tracing::info!(sailbox = %exec.sailbox, exec = %exec.id, background = exec.background, "exec");
        self.launch(&live, &vm, &exec).await?;
        self.watch(&live, exec.id.clone());
        Ok(pb::ExecHandle { exec_id: exec.id, sailbox_id: exec.sailbox })
    }

    /// Records a new request as the sailbox's active one, durably, before it runs (so it
    /// exists and blocks a second one). The caller holds the op lock.
    fn record_new(&self, live: &Arc<Live>, req: &pb::ExecRequest) -> Result<ExecRecord> {
        let rec = live.snapshot();
        if let Some(active) = &rec.active_exec {
            return Err(SailboxError::ExecAlreadyRunning { sailbox: rec.id.clone(), active: active.clone() });
        }
        let exec = ExecRecord {
            id: random_exec_id(),
            sailbox: rec.id.clone(),
            command: req.command.clone(),
            cwd: req.cwd.clone(),
            timeout_ms: req.timeout_ms,
            background: req.background,
            env: req.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>(),
            started_unix_ms: now_ms(),
            status: ExecStatus::Running,
        };
        let rec = live.update(|r| r.active_exec = Some(exec.id.clone()));
        let st = &self.rt.state;
        st.commit(st.changes().exec(st, &exec).sailbox(st, &rec))?;
        let _ = self.channel(&exec.id);
        Ok(exec)
    }

    /// Has the agent start a recorded request; if it cannot, the request is recorded as
    /// failed and the sailbox freed.
    async fn launch(&self, live: &Arc<Live>, vm: &Vm, exec: &ExecRecord) -> Result<()> {
        // Bounded: the op lock is held, and a hung guest must not block terminate forever.
        let started = tokio::time::timeout(START_TIMEOUT, vm.agent.raw().start_exec(start_request(exec)))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("the agent did not answer in time")));
        let Err(status) = started else { return Ok(()) };
        let why = format!("the agent could not start it: {}", status.message());
        let mut failed = exec.clone();
        failed.status = ExecStatus::Failed(why.clone());
        let rec = live.update(|r| r.active_exec = None);
        let st = &self.rt.state;
        st.commit(st.changes().exec(st, &failed).sailbox(st, &rec))?;
        self.notify(&exec.id);
        Err(if status.code() == tonic::Code::InvalidArgument {
            SailboxError::InvalidArgument(status.message().to_owned())
        } else {
            SailboxError::Execution(why)
        })
    }

    /// Stores an agent's result and frees the sailbox for the next exec.
    async fn record_result(&self, live: &Arc<Live>, id: &str, result: apb::ExecResult) -> Result<()> {
        let _op = live.op.lock().await;
        let Some(mut exec) = self.rt.state.exec(id)? else { return Ok(()) };
        if exec.status != ExecStatus::Running {
            return Ok(());
        }
        exec.status = ExecStatus::Finished;
        let result = result_to_proto(&exec, result);
        let rec = live.update(|r| {
            if r.active_exec.as_deref() == Some(id) {
                r.active_exec = None;
            }
        });
        let st = &self.rt.state;
        st.commit(st.changes().exec_result(st, id, &result).exec(st, &exec).sailbox(st, &rec))?;
        self.notify(id);
        tracing::info!(sailbox = %rec.id, exec = %id, code = result.return_code, "exec finished");
        Ok(())
    }

    async fn finish_exec(&self, live: &Arc<Live>, exec: &ExecRecord, status: ExecStatus) -> Result<()> {
        let _op = live.op.lock().await;
        let rec = live.update(|r| {
            if r.active_exec.as_deref() == Some(exec.id.as_str()) {
                r.active_exec = None;
            }
        });
        let mut failed = exec.clone();
        failed.status = status;
        let st = &self.rt.state;
        st.commit(st.changes().exec(st, &failed).sailbox(st, &rec))?;
        self.notify(&exec.id);
        Ok(())
    }

    /// The final result of an exec, or the error that ended it; waits while it runs (up to
    /// `timeout`, if given).
    pub(crate) async fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<pb::ExecResult> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            if let Some(done) = self.settled(id)? {
                return done;
            }
            // Subscribe only to a running request, then look again: a finish between the
            // first look and the subscription would otherwise be missed. Waiting on finished
            // or unknown ids leaves nothing behind in the table.
            let mut rx = self.channel(id);
            if let Some(done) = self.settled(id)? {
                drop(rx);
                self.prune(id);
                return done;
            }
            let changed = rx.wait_for(|done| *done);
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, changed).await.is_err() {
                        // Still running: its channel stays until it is notified.
                        return Err(SailboxError::Timeout(format!("exec {id} still running")));
                    }
                }
                None => {
                    let _ = changed.await;
                }
            }
        }
    }

    /// The outcome of a request that is no longer running (`None` while it runs).
    fn settled(&self, id: &str) -> Result<Option<Result<pb::ExecResult>>> {
        let exec = self.rt.state.exec(id)?.ok_or_else(|| SailboxError::ExecNotFound(id.to_owned()))?;
        Ok(match exec.status {
            ExecStatus::Finished => {
                Some(self.rt.state.exec_result(id)?.ok_or_else(|| SailboxError::MissingResult(id.to_owned())))
            }
            ExecStatus::Failed(why) => Some(Err(SailboxError::Execution(why))),
            ExecStatus::Lost(why) => Some(Err(SailboxError::WorkerLost { id: exec.sailbox, reason: why })),
            ExecStatus::Terminated => Some(Err(SailboxError::Terminated(exec.sailbox))),
            ExecStatus::Running => None,
        })
    }

    /// Drops the channel of a settled request when nobody waits on it (a finished request's
    /// channel is otherwise only removed by its notification, which already happened).
    fn prune(&self, id: &str) {
        let mut done = self.done.lock();
        if done.get(id).is_some_and(|tx| tx.receiver_count() == 0) {
            done.remove(id);
        }
    }

    /// Channels held (for tests of the table's bound).
    pub(crate) fn channels(&self) -> usize {
        self.done.lock().len()
    }

    /// Output of an exec as it is produced (live from the agent while it runs, from the
    /// record once finished), then its result.
    pub(crate) fn stream(self: &Arc<Self>, id: &str) -> Result<mpsc::Receiver<Result<pb::ExecOutput, tonic::Status>>> {
        let exec = self.rt.state.exec(id)?.ok_or_else(|| SailboxError::ExecNotFound(id.to_owned()))?;
        let (tx, rx) = mpsc::channel(16);
        let execs = self.clone();
        tokio::spawn(async move {
            let mut sent = Sent::default();
            if exec.status == ExecStatus::Running && !execs.stream_live(&exec, &tx, &mut sent).await {
                return;
            }
            execs.stream_rest(&exec.id, &tx, &sent).await;
        });
        Ok(rx)
    }

    /// Forwards a running exec's output live from the agent until it ends; false when the
    /// receiver went away.
    async fn stream_live(
        &self,
        exec: &ExecRecord,
        tx: &mpsc::Sender<Result<pb::ExecOutput, tonic::Status>>,
        sent: &mut Sent,
    ) -> bool {
        use pb::exec_output::Event;
        let Some(vm) = self.rt.live(&exec.sailbox).and_then(|l| l.vm()) else { return true };
        let req = apb::WaitExecRequest { request_id: exec.id.clone(), stdout_offset: 0, stderr_offset: 0 };
        let Ok(resp) = vm.agent.raw().stream_exec(req).await else { return true };
        let mut events = resp.into_inner();
        while let Some(Ok(ev)) = events.next().await {
            let event = match ev.event {
                Some(apb::exec_event::Event::Stdout(b)) => {
                    sent.stdout += b.len() as u64;
                    Event::Stdout(b)
                }
                Some(apb::exec_event::Event::Stderr(b)) => {
                    sent.stderr += b.len() as u64;
                    Event::Stderr(b)
                }
                // The watcher records the result; the final event comes from it.
                Some(apb::exec_event::Event::Result(_)) | None => break,
            };
            if tx.send(Ok(pb::ExecOutput { event: Some(event) })).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Waits for an exec's record, then sends the output not yet sent and the result (or
    /// the error that ended it).
    async fn stream_rest(&self, id: &str, tx: &mpsc::Sender<Result<pb::ExecOutput, tonic::Status>>, sent: &Sent) {
        use pb::exec_output::Event;
        let result = match self.wait(id, None).await {
            Ok(result) => result,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let rest_out = result.stdout.get(sent.stdout as usize..).unwrap_or_default().to_vec();
        let rest_err = result.stderr.get(sent.stderr as usize..).unwrap_or_default().to_vec();
        for event in [Event::Stdout(rest_out), Event::Stderr(rest_err)] {
            let empty = matches!(&event, Event::Stdout(b) | Event::Stderr(b) if b.is_empty());
            if !empty && tx.send(Ok(pb::ExecOutput { event: Some(event) })).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(pb::ExecOutput { event: Some(Event::Result(result)) })).await;
    }
}
