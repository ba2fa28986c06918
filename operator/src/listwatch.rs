//! List and watch one kind, knowing at every step the revision up to which this replica has
//! seen everything of it.
//!
//! kube-runtime's watcher does not say which resourceVersion its list or its position stand at,
//! so this is a small list-then-watch of its own: a paginated LIST gives every object at the
//! list's resourceVersion, a WATCH from there gives each change with its resourceVersion, and
//! bookmarks (requested) move the position on when nothing changes. A watch that ends is
//! resumed from the last position; one the server no longer can resume (`410 Gone`) is
//! replaced by a fresh list. Errors back off exponentially (100 ms to 30 s, jittered), and
//! every request has a deadline.
//!
//! Revisions are the etcd revisions the apiserver exposes as resourceVersions: integers, ordered
//! across every kind of one cluster. They make the states of two replicas (or of one replica
//! before and after a restart) comparable — see docs/architecture.md, "Revisions".
use cortexflow_runtime::backoff::Backoff;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use kube::{
    Api, Resource,
    api::{ListParams, WatchEvent, WatchParams},
    core::{DeserializeGuard, error_boundary::InvalidObject},
};
use serde::de::DeserializeOwned;

/// An object, or what is left of one that did not deserialize (its metadata, the error).
pub type Object<K> = Result<K, Box<InvalidObject>>;

/// What a watch saw.
#[derive(Debug)]
pub enum Seen<K> {
    /// Every object of the kind as of `revision` (the first list, or a relist): replaces
    /// what was known.
    Listed(Vec<Object<K>>, u64),
    /// An object was created or changed at `revision`.
    Applied(Object<K>, u64),
    /// An object was deleted at `revision`.
    Deleted(Object<K>, u64),
    /// Nothing changed up to `revision` (a bookmark).
    Progress(u64),
    /// A request failed; the watch retries after the given backoff.
    Failed(String, Duration),
}

/// How long one list page may take.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// The server ends a watch after this long (it is then resumed): the apiserver's own cap is
/// larger, and a bounded watch finds a dead connection that sends nothing.
const WATCH_SECS: u32 = 240;
/// No event and no bookmark for this long: list again. A kind that does not change would
/// otherwise stand at the revision of its last event or bookmark (the apiserver sends one about
/// every minute, not on demand), and with it the replica's revision (the minimum over every
/// source). A replica started before another then looks older than the state its successor
/// gave the agents, which keep the kernel's state and hold back new pods until it catches up.
/// A fresh list is consistent at the current revision, so it catches up at once; it also finds a
/// dead connection that sends nothing. Kinds that change often never get here.
const IDLE_RELIST: Duration = Duration::from_secs(15);

/// The resourceVersion of an object as a revision (`0` when it is not a number).
pub fn revision_of(rv: Option<&str>) -> u64 {
    rv.and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn rv_of<K: Resource>(o: &Object<K>) -> u64 {
    match o {
        Ok(k) => revision_of(k.meta().resource_version.as_deref()),
        Err(e) => revision_of(e.metadata.resource_version.as_deref()),
    }
}

/// Exponential backoff with full jitter for API errors: 100 ms doubling to 30 s.
fn api_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
}

/// Lists every object (pages of 500) and the list's revision.
async fn list<K>(
    api: &Api<DeserializeGuard<K>>,
    fields: Option<&str>,
) -> Result<(Vec<Object<K>>, u64), String>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(500);
        if let Some(f) = fields {
            lp = lp.fields(f);
        }
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = tokio::time::timeout(LIST_TIMEOUT, api.list(&lp))
            .await
            .map_err(|_| format!("list did not answer within {LIST_TIMEOUT:?}"))?
            .map_err(|e| format!("list: {e}"))?;
        let rv = revision_of(page.metadata.resource_version.as_deref());
        out.extend(
            page.items
                .into_iter()
                .map(|DeserializeGuard(o)| o.map_err(Box::new)),
        );
        match page.metadata.continue_.filter(|t| !t.is_empty()) {
            Some(t) => token = Some(t),
            // A paginated list is consistent at the first page's revision, and every page
            // carries it.
            None => return Ok((out, rv)),
        }
    }
}

/// Lists and watches the objects of `api` (restricted by the field selector `fields`), forever.
pub fn list_watch<K>(
    api: Api<DeserializeGuard<K>>,
    fields: Option<String>,
) -> impl Stream<Item = Seen<K>> + Send
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    async_stream::stream! {
        let mut backoff = api_backoff();
        'relist: loop {
            let (objects, mut position) = match list(&api, fields.as_deref()).await {
                Ok(l) => l,
                Err(e) => {
                    let wait = backoff.next_wait();
                    yield Seen::Failed(e, wait);
                    tokio::time::sleep(wait).await;
                    continue 'relist;
                }
            };
            backoff.reset();
            yield Seen::Listed(objects, position);
            loop {
                let mut wp = WatchParams::default().timeout(WATCH_SECS);
                if let Some(f) = &fields {
                    wp = wp.fields(f);
                }
                let stream = match tokio::time::timeout(
                    LIST_TIMEOUT,
                    api.watch(&wp, &position.to_string()),
                )
                .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(kube::Error::Api(e))) if e.code == 410 => continue 'relist,
                    Ok(Err(e)) => {
                        let wait = backoff.next_wait();
                        yield Seen::Failed(format!("watch: {e}"), wait);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    Err(_) => {
                        let wait = backoff.next_wait();
                        yield Seen::Failed("watch did not answer".into(), wait);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                };
                let mut stream = std::pin::pin!(stream);
                loop {
                    let ev = match tokio::time::timeout(IDLE_RELIST, stream.next()).await {
                        // Ended (the server's timeout): resume from the position.
                        Ok(None) => break,
                        // Idle: list again, at the current revision.
                        Err(_) => continue 'relist,
                        Ok(Some(ev)) => ev,
                    };
                    match ev {
                        Ok(WatchEvent::Added(DeserializeGuard(o)) | WatchEvent::Modified(DeserializeGuard(o))) => {
                            let o = o.map_err(Box::new);
                            position = position.max(rv_of(&o));
                            backoff.reset();
                            yield Seen::Applied(o, position);
                        }
                        Ok(WatchEvent::Deleted(DeserializeGuard(o))) => {
                            let o = o.map_err(Box::new);
                            position = position.max(rv_of(&o));
                            backoff.reset();
                            yield Seen::Deleted(o, position);
                        }
                        Ok(WatchEvent::Bookmark(b)) => {
                            position = position.max(revision_of(Some(&b.metadata.resource_version)));
                            yield Seen::Progress(position);
                        }
                        Ok(WatchEvent::Error(status)) if status.code == 410 => {
                            // Too old to resume: list again.
                            continue 'relist;
                        }
                        Ok(WatchEvent::Error(status)) => {
                            let wait = backoff.next_wait();
                            yield Seen::Failed(format!("watch: {status:?}"), wait);
                            tokio::time::sleep(wait).await;
                            break;
                        }
                        Err(e) => {
                            let wait = backoff.next_wait();
                            yield Seen::Failed(format!("watch: {e}"), wait);
                            tokio::time::sleep(wait).await;
                            break;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_backoff_doubles_from_100_ms_to_30_s() {
        let mut b = api_backoff();
        let waits: Vec<Duration> = (0..12).map(|_| b.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits[3] >= Duration::from_millis(400) && waits[3] <= Duration::from_millis(800));
        for w in &waits[9..] {
            assert!(
                *w >= Duration::from_secs(15) && *w <= Duration::from_secs(30),
                "{w:?}"
            );
        }
    }

    #[test]
    fn revisions_are_numbers_or_unknown() {
        assert_eq!(revision_of(Some("123456")), 123456);
        assert_eq!(revision_of(Some("")), 0);
        assert_eq!(revision_of(Some("abc")), 0);
        assert_eq!(revision_of(None), 0);
    }
}
