//! Leader election among controllers on a real etcd (groundwork of HA): one leads, the others
//! know who; a resigning leader is replaced at once, a dead one within its lease; a leader cut
//! off from etcd steps down before its lease expires, so two never lead at once.

use std::time::{Duration, Instant};

use runyard_controller::leader::{self, Role};
use runyard_tests::etcd::EtcdServer;
use runyard_tests::proxy::Proxy;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(2);
const LONG: Duration = Duration::from_secs(20);

async fn client(endpoint: &str) -> anyhow::Result<etcd_client::Client> {
    Ok(etcd_client::Client::connect([endpoint], None).await?)
}

/// Waits until `f` holds of the roles, sampling every 10 ms; fails if ever two lead at once.
async fn until(
    roles: &[&watch::Receiver<Role>],
    what: &str,
    f: impl Fn(&[Role]) -> bool,
) -> anyhow::Result<Vec<Role>> {
    let deadline = Instant::now() + LONG;
    loop {
        let now: Vec<Role> = roles.iter().map(|r| r.borrow().clone()).collect();
        let leaders = now.iter().filter(|r| r.is_leader()).count();
        anyhow::ensure!(leaders <= 1, "two leaders at once: {now:?}");
        if f(&now) {
            return Ok(now);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leads_the_others_know_it_and_a_resigning_leader_is_replaced_at_once()
-> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let (ca, cb) = (CancellationToken::new(), CancellationToken::new());
    let a = leader::campaign(
        client(&etcd.endpoint).await?,
        "/t/leader".into(),
        "a:7900".into(),
        TTL,
        ca.clone(),
    );
    let roles = until(&[&a], "a to lead", |r| r[0].is_leader()).await?;
    let Role::Leader { fence } = &roles[0] else {
        unreachable!()
    };
    assert!(fence.revision > 0);
    let b = leader::campaign(
        client(&etcd.endpoint).await?,
        "/t/leader".into(),
        "b:7900".into(),
        TTL,
        cb.clone(),
    );
    until(&[&a, &b], "b to see a lead", |r| {
        r[1] == Role::Follower {
            leader: Some("a:7900".into()),
        }
    })
    .await?;
    // Still a, well past several renewals.
    tokio::time::sleep(TTL * 2).await;
    assert!(a.borrow().is_leader() && !b.borrow().is_leader());
    let resigned = Instant::now();
    ca.cancel();
    let roles = until(&[&a, &b], "b to lead", |r| r[1].is_leader()).await?;
    assert!(
        resigned.elapsed() < TTL,
        "a resignation needs no lease expiry: {:?}",
        resigned.elapsed()
    );
    assert!(!roles[0].is_leader());
    let Role::Leader { fence: new } = &roles[1] else {
        unreachable!()
    };
    assert!(
        new.revision > fence.revision,
        "a new fence: {new:?} after {fence:?}"
    );
    cb.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_steps_down_before_another_leads() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await?;
    let proxy = Proxy::start(etcd.endpoint.parse()?).await?;
    let cancel = CancellationToken::new();
    let a = leader::campaign(
        client(&proxy.addr.to_string()).await?,
        "/t/leader".into(),
        "a:7900".into(),
        TTL,
        cancel.clone(),
    );
    until(&[&a], "a to lead", |r| r[0].is_leader()).await?;
    let b = leader::campaign(
        client(&etcd.endpoint).await?,
        "/t/leader".into(),
        "b:7900".into(),
        TTL,
        cancel.clone(),
    );
    until(&[&a, &b], "b to follow a", |r| {
        r[1] == Role::Follower {
            leader: Some("a:7900".into()),
        }
    })
    .await?;

    // a's host loses etcd (as if it died, or its network did): a steps down on its own, and b
    // leads once a's lease has expired, never both at once (checked at every sample).
    let cut = Instant::now();
    proxy.cut();
    until(&[&a, &b], "a to step down", |r| !r[0].is_leader()).await?;
    let stepped_down = cut.elapsed();
    until(&[&a, &b], "b to lead", |r| r[1].is_leader()).await?;
    let took_over = cut.elapsed();
    assert!(
        stepped_down < TTL,
        "a stepped down after {stepped_down:?}: before its lease could expire"
    );
    assert!(took_over > stepped_down);
    assert!(
        took_over < TTL + Duration::from_secs(2),
        "b led after {took_over:?}"
    );

    // a's network comes back: it campaigns again, and follows b.
    proxy.restore();
    until(&[&a, &b], "a to follow b", |r| {
        r[0] == Role::Follower {
            leader: Some("b:7900".into()),
        }
    })
    .await?;
    cancel.cancel();
    Ok(())
}

/// A store fenced by a leadership refuses every write once another controller leads, and writes
/// again once fenced by the new leadership; nothing a deposed leader sends changes the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fenced_by_a_lost_leadership_change_nothing() -> anyhow::Result<()> {
    use runyard_controller::store::{EtcdStore, Precondition, Store, StoreError};
    let etcd = EtcdServer::start().await?;
    let endpoints = vec![etcd.endpoint.clone()];
    let connect = || EtcdStore::connect(&endpoints, "/t/", Duration::from_secs(5));
    let (old_store, new_store) = (connect().await?, connect().await?);
    let (ca, cb) = (CancellationToken::new(), CancellationToken::new());
    let a = leader::campaign(
        client(&etcd.endpoint).await?,
        "/t/leader".into(),
        "a".into(),
        TTL,
        ca.clone(),
    );
    let roles = until(&[&a], "a to lead", |r| r[0].is_leader()).await?;
    let Role::Leader { fence } = roles[0].clone() else {
        unreachable!()
    };
    old_store.set_fence(Some(fence));
    let v1 = old_store
        .put("jobs/x", b"by a".to_vec(), Precondition::Absent)
        .await?;
    old_store
        .put_all(vec![("jobs/y".into(), b"by a".to_vec(), Precondition::Any)])
        .await?;

    // b takes over; a's handle still carries a's fence.
    let b = leader::campaign(
        client(&etcd.endpoint).await?,
        "/t/leader".into(),
        "b".into(),
        TTL,
        cb.clone(),
    );
    ca.cancel();
    let roles = until(&[&a, &b], "b to lead", |r| r[1].is_leader()).await?;
    let Role::Leader { fence: new_fence } = roles[1].clone() else {
        unreachable!()
    };
    for refused in [
        old_store
            .put("jobs/x", b"late a".to_vec(), Precondition::Version(v1))
            .await
            .map(drop),
        old_store
            .put("jobs/z", b"late a".to_vec(), Precondition::Any)
            .await
            .map(drop),
        old_store
            .put_all(vec![(
                "jobs/y".into(),
                b"late a".to_vec(),
                Precondition::Any,
            )])
            .await
            .map(drop),
        old_store.delete("jobs/y").await,
    ] {
        assert!(
            matches!(refused, Err(StoreError::Fenced { .. })),
            "{refused:?}"
        );
    }
    assert_eq!(new_store.get("jobs/x").await?.unwrap().value, b"by a");
    assert_eq!(new_store.get("jobs/y").await?.unwrap().value, b"by a");
    assert!(new_store.get("jobs/z").await?.is_none());
    // The new leader writes under its own fence; a compare-and-swap still fails on its own.
    new_store.set_fence(Some(new_fence));
    new_store
        .put("jobs/x", b"by b".to_vec(), Precondition::Version(v1))
        .await?;
    let conflict = new_store
        .put("jobs/x", b"stale".to_vec(), Precondition::Version(v1))
        .await;
    assert!(
        matches!(conflict, Err(StoreError::Conflict { .. })),
        "{conflict:?}"
    );
    new_store.delete("jobs/y").await?;
    assert!(new_store.get("jobs/y").await?.is_none());
    cb.cancel();
    Ok(())
}
