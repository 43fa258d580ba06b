//! Harness tests of every function of the reference application (no runtime): the
//! saga's compensations, counter duplicates and reordering, promotions, loyalty, the
//! analytics windows, and product-intake's validation and image processing against a
//! real local-filesystem object store.

use std::sync::Arc;

use inventory::functions::bill;
use inventory::*;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use statefun_sdk::{Effects, TestHarness};

fn module() -> statefun_sdk::Module {
    inventory::module(AppConfig::new("north"), Arc::new(InMemory::new())).unwrap()
}

fn pos(seq: u32, action: PosAction) -> PosEvent {
    PosEvent {
        store: "s1".into(),
        counter: "c1".into(),
        seq,
        action,
    }
}

fn scan(seq: u32, sku: &str) -> PosEvent {
    pos(
        seq,
        PosAction::Scan {
            sku: sku.into(),
            customer: "cust-1".into(),
        },
    )
}

fn reserved(sku: &str, ok: bool, price_cents: i64) -> CartEvent {
    CartEvent::Reserved {
        sku: sku.into(),
        qty: 1,
        ok,
        price_cents,
        multibuy: None,
    }
}

fn cart(id: &str) -> TestHarness {
    TestHarness::from_module(&module(), &CART).unwrap().with_id(id)
}

fn inventory_cmds(e: &Effects) -> Vec<(String, InventoryCmd)> {
    e.outgoing
        .iter()
        .filter(|m| m.target.type_name() == &INVENTORY)
        .map(|m| (m.target.id().to_owned(), m.message.decode().unwrap()))
        .collect()
}

/// The records an invocation sent to egress `id`.
fn egress<T: statefun_sdk::ValueType>(e: &Effects, id: &statefun_sdk::TypeName) -> Vec<T> {
    e.egress
        .iter()
        .filter(|m| &m.egress == id)
        .map(|m| m.message.decode().unwrap())
        .collect()
}

fn orders(e: &Effects) -> Vec<OrderSummary> {
    egress(e, &ORDERS)
}

fn product(sku: &str, price_cents: i64) -> Product {
    Product {
        sku: sku.into(),
        title: "Tea".into(),
        description: "Green tea, 100 g".into(),
        price_cents,
        image: None,
        multibuy: None,
        discontinued: false,
    }
}

#[test]
fn out_of_stock_mid_basket_bills_only_reserved_items_and_cancel_releases_the_earlier_ones() {
    let mut h = cart("b1");
    h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    h.invoke_value_blocking(&scan(2, "SKU-00002")).unwrap();
    h.invoke_value_blocking(&reserved("SKU-00001", true, 250)).unwrap();
    h.invoke_value_blocking(&reserved("SKU-00002", false, 400)).unwrap();
    let basket = h.state(&BASKET).unwrap().unwrap();
    assert_eq!(basket.rejected, 1);
    assert_eq!(basket.items.len(), 1);
    let cancelled = h.invoke_value_blocking(&pos(3, PosAction::Cancel)).unwrap();
    assert_eq!(
        inventory_cmds(&cancelled),
        vec![("SKU-00001".into(), InventoryCmd::Release { qty: 1 })],
        "the earlier reservation is compensated, the refused one was never held"
    );
    assert!(orders(&cancelled).is_empty());

    let mut h = cart("b2");
    h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    h.invoke_value_blocking(&scan(2, "SKU-00002")).unwrap();
    h.invoke_value_blocking(&reserved("SKU-00002", false, 400)).unwrap();
    h.invoke_value_blocking(&pos(3, PosAction::Checkout)).unwrap();
    let done = h.invoke_value_blocking(&reserved("SKU-00001", true, 250)).unwrap();
    let order = &orders(&done)[0];
    assert_eq!((order.bill.items, order.bill.total_cents), (1, 250));
    assert_eq!(
        inventory_cmds(&done),
        vec![(
            "SKU-00001".into(),
            InventoryCmd::Commit {
                qty: 1,
                price_cents: 250
            }
        )]
    );
}

#[test]
fn duplicate_counter_events_are_applied_once() {
    let mut h = cart("b1");
    let first = h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    let again = h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    assert_eq!(inventory_cmds(&first).len(), 1);
    assert!(
        again.outgoing.is_empty() && again.state.is_empty(),
        "a repeated event is a no-op"
    );
    h.invoke_value_blocking(&reserved("SKU-00001", true, 100)).unwrap();
    let paid = h.invoke_value_blocking(&pos(2, PosAction::Checkout)).unwrap();
    let repeated = h.invoke_value_blocking(&pos(2, PosAction::Checkout)).unwrap();
    assert_eq!(orders(&paid).len(), 1);
    assert!(repeated.outgoing.is_empty() && repeated.egress.is_empty());
}

#[test]
fn out_of_order_counter_events_wait_for_the_gap() {
    let mut h = cart("b1");
    // The checkout (3) and the second scan (2) overtake each other.
    let early = h.invoke_value_blocking(&pos(3, PosAction::Checkout)).unwrap();
    assert!(inventory_cmds(&early).is_empty(), "nothing applies before event 1");
    h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    let filled = h.invoke_value_blocking(&scan(2, "SKU-00002")).unwrap();
    assert_eq!(
        inventory_cmds(&filled).len(),
        1,
        "event 2 applies, then the held checkout"
    );
    assert_eq!(h.state(&BASKET).unwrap().unwrap().status, BasketStatus::CheckingOut);
    h.invoke_value_blocking(&reserved("SKU-00001", true, 100)).unwrap();
    let done = h.invoke_value_blocking(&reserved("SKU-00002", true, 300)).unwrap();
    assert_eq!(orders(&done)[0].bill.items, 2);
}

#[test]
fn checkout_of_an_empty_basket_closes_it_without_an_order() {
    let mut h = cart("b1");
    let e = h.invoke_value_blocking(&pos(1, PosAction::Checkout)).unwrap();
    assert!(orders(&e).is_empty() && e.outgoing.is_empty());
    assert_eq!(h.state(&BASKET).unwrap().unwrap().status, BasketStatus::Released);
    assert!(h.pending_delayed().is_empty(), "no abandon timer is left behind");
}

/// Asks `inventory` to reserve one item for basket b1; returns whether it agreed.
fn reserve_one(inventory: &mut TestHarness) -> bool {
    let e = inventory
        .invoke_value_blocking(&InventoryCmd::Reserve {
            basket: "b1".into(),
            qty: 1,
        })
        .unwrap();
    match e.outgoing[0].message.decode().unwrap() {
        CartEvent::Reserved { ok, .. } => ok,
        other => panic!("unexpected answer {other:?}"),
    }
}

#[test]
fn unknown_and_discontinued_skus_are_refused_by_the_inventory() {
    let m = module();
    let mut unknown = TestHarness::from_module(&m, &INVENTORY).unwrap().with_id("SKU-09999");
    assert!(!reserve_one(&mut unknown));

    let mut gone = TestHarness::from_module(&m, &INVENTORY).unwrap().with_id("SKU-00001");
    gone.invoke_value_blocking(&InventoryCmd::Upsert {
        product: product("SKU-00001", 100),
        delivered: 5,
    })
    .unwrap();
    assert!(reserve_one(&mut gone), "a product in the range is sold");
    gone.invoke_value_blocking(&InventoryCmd::Release { qty: 1 }).unwrap();
    let mut p = product("SKU-00001", 100);
    p.discontinued = true;
    gone.invoke_value_blocking(&InventoryCmd::Upsert {
        product: p,
        delivered: 0,
    })
    .unwrap();
    assert!(!reserve_one(&mut gone), "a discontinued product is not");
    assert_eq!(gone.state(&STOCK).unwrap().unwrap().reserved, 0);
}

#[test]
fn abandon_timer_releases_reservations_and_is_cancelled_by_checkout() {
    let mut h = cart("b1");
    h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    h.invoke_value_blocking(&reserved("SKU-00001", true, 100)).unwrap();
    let fired = h.advance(AppConfig::new("north").abandon_after);
    assert_eq!(fired.len(), 1);
    let released = h.invoke_from_blocking(None, fired[0].message.clone()).unwrap();
    assert_eq!(
        inventory_cmds(&released),
        vec![("SKU-00001".into(), InventoryCmd::Release { qty: 1 })]
    );
    assert_eq!(h.state(&BASKET).unwrap().unwrap().status, BasketStatus::Abandoned);

    let mut h = cart("b2");
    h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    h.invoke_value_blocking(&pos(2, PosAction::Checkout)).unwrap();
    assert!(h.pending_delayed().is_empty(), "checkout cancels the abandon timer");
}

#[test]
fn removing_an_item_releases_it_even_while_its_reservation_travels() {
    let mut h = cart("b1");
    h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    h.invoke_value_blocking(&pos(
        2,
        PosAction::Remove {
            sku: "SKU-00001".into(),
        },
    ))
    .unwrap();
    let answered = h.invoke_value_blocking(&reserved("SKU-00001", true, 100)).unwrap();
    assert_eq!(
        inventory_cmds(&answered),
        vec![("SKU-00001".into(), InventoryCmd::Release { qty: 1 })]
    );
    assert!(h.state(&BASKET).unwrap().unwrap().items.is_empty());
}

#[test]
fn promotions_apply_multi_buy_then_the_code() {
    let items = [("SKU-00001".to_string(), 7), ("SKU-00002".to_string(), 1)].into();
    let prices = [
        ("SKU-00001".to_string(), (100, Some(MultiBuy { buy: 3, pay: 2 }))),
        ("SKU-00002".to_string(), (1000, None)),
    ]
    .into();
    // 7 x 1.00 with two "3 for 2" groups: 2.00 off; 10% off the remaining 15.00.
    let b = bill(&items, &prices, Some("SAVE10"));
    assert_eq!(b.gross_cents, 1700);
    assert_eq!(b.discount_cents, 200 + 150);
    assert_eq!(b.total_cents, 1350);
    assert_eq!(
        bill(&items, &prices, Some("BOGUS")).total_cents,
        1500,
        "unknown codes are ignored"
    );
}

#[test]
fn loyalty_credits_each_basket_once_and_recommends_a_favourite() {
    let mut h = TestHarness::from_module(&module(), &LOYALTY).unwrap().with_id("cust-1");
    let purchase = |basket: &str, sku: &str, qty, total_cents| Purchase {
        basket: basket.into(),
        lines: [(sku.to_string(), qty)].into(),
        total_cents,
    };
    h.invoke_value_blocking(&purchase("b1", "SKU-00001", 3, 30_000))
        .unwrap();
    h.invoke_value_blocking(&purchase("b1", "SKU-00001", 3, 30_000))
        .unwrap();
    h.invoke_value_blocking(&purchase("b2", "SKU-00002", 1, 1_000)).unwrap();
    let acc = h.state(&ACCOUNT).unwrap().unwrap();
    assert_eq!(acc.orders, 2);
    assert_eq!(acc.spend_cents, 31_000);
    // 300 points at bronze, then 10 euros at silver (2 per euro).
    assert_eq!(acc.points, 300 + 20);
    assert_eq!(acc.tier, Tier::Silver);
    assert_eq!(acc.recommendation.as_deref(), Some("SKU-00001"));
}

#[test]
fn inventory_windows_sum_sales_and_deliveries_for_analytics() {
    let mut h = TestHarness::from_module(&module(), &INVENTORY)
        .unwrap()
        .with_id("SKU-00001");
    h.invoke_value_blocking(&InventoryCmd::Upsert {
        product: product("SKU-00001", 250),
        delivered: 10,
    })
    .unwrap();
    h.invoke_value_blocking(&InventoryCmd::Reserve {
        basket: "b1".into(),
        qty: 2,
    })
    .unwrap();
    h.invoke_value_blocking(&InventoryCmd::Commit {
        qty: 2,
        price_cents: 250,
    })
    .unwrap();
    let fired = h.advance(AppConfig::new("north").window);
    assert_eq!(fired.len(), 1, "one flush timer per window");
    let flushed = h.invoke_from_blocking(None, fired[0].message.clone()).unwrap();
    let w: SkuWindow = flushed.egress[0].message.decode().unwrap();
    assert_eq!(
        (
            w.region.as_str(),
            w.seq,
            w.sold,
            w.revenue_cents,
            w.delivered,
            w.on_hand
        ),
        ("north", 0, 2, 500, 10, 8)
    );
    assert!(h.pending_delayed().is_empty(), "a quiet SKU arms no timer");
}

#[test]
fn malformed_counter_events_and_scans_without_a_sku_are_refused_and_the_basket_goes_on() {
    let mut h = cart("b1");
    h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    h.invoke_value_blocking(&reserved("SKU-00001", true, 100)).unwrap();
    let garbled = statefun_sdk::TypedValue::from_bytes(
        <PosEvent as statefun_sdk::ValueType>::TYPE_NAME,
        b"{\"seq\": 2, ".to_vec(),
    );
    let e = h.invoke_blocking(garbled).unwrap();
    let refused = egress::<Rejected>(&e, &REJECTED);
    assert!(refused[0].reason.contains("malformed counter event"), "{refused:?}");
    let e = h.invoke_value_blocking(&scan(2, "")).unwrap();
    assert_eq!(egress::<Rejected>(&e, &REJECTED)[0].reason, "scan without a SKU");
    let cancelled = h.invoke_value_blocking(&pos(3, PosAction::Cancel)).unwrap();
    assert_eq!(
        inventory_cmds(&cancelled),
        vec![("SKU-00001".into(), InventoryCmd::Release { qty: 1 })],
        "the basket was not parked: its reservation is still compensated"
    );
}

#[test]
fn a_reservation_reply_the_basket_is_not_waiting_for_is_handed_back() {
    let mut h = cart("b1");
    let e = h.invoke_value_blocking(&reserved("SKU-00001", true, 100)).unwrap();
    assert_eq!(
        inventory_cmds(&e),
        vec![("SKU-00001".into(), InventoryCmd::Release { qty: 1 })]
    );
    assert!(
        h.state(&BASKET).unwrap().is_none(),
        "no basket is opened by a stray reply"
    );
    h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    h.invoke_value_blocking(&reserved("SKU-00001", true, 100)).unwrap();
    let duplicate = h.invoke_value_blocking(&reserved("SKU-00001", true, 100)).unwrap();
    assert_eq!(
        inventory_cmds(&duplicate),
        vec![("SKU-00001".into(), InventoryCmd::Release { qty: 1 })]
    );
    assert_eq!(h.state(&BASKET).unwrap().unwrap().items["SKU-00001"], 1);
}

#[test]
fn a_counter_that_comes_back_after_the_abandon_timer_revives_the_basket() {
    let mut h = cart("b1");
    h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    h.invoke_value_blocking(&scan(2, "SKU-00002")).unwrap();
    h.invoke_value_blocking(&reserved("SKU-00001", true, 100)).unwrap();
    let fired = h.advance(AppConfig::new("north").abandon_after);
    let abandoned = h.invoke_from_blocking(None, fired[0].message.clone()).unwrap();
    assert_eq!(
        inventory_cmds(&abandoned),
        vec![("SKU-00001".into(), InventoryCmd::Release { qty: 1 })]
    );
    // The reservation still travelling when the timer fired is handed back too.
    let late = h.invoke_value_blocking(&reserved("SKU-00002", true, 300)).unwrap();
    assert_eq!(
        inventory_cmds(&late),
        vec![("SKU-00002".into(), InventoryCmd::Release { qty: 1 })]
    );
    assert_eq!(h.state(&BASKET).unwrap().unwrap().status, BasketStatus::Abandoned);

    let back = h.invoke_value_blocking(&pos(3, PosAction::Checkout)).unwrap();
    let reserve = |sku: &str| {
        (
            sku.to_string(),
            InventoryCmd::Reserve {
                basket: "b1".into(),
                qty: 1,
            },
        )
    };
    assert_eq!(inventory_cmds(&back), vec![reserve("SKU-00001"), reserve("SKU-00002")]);
    assert!(orders(&back).is_empty(), "the checkout waits for the new reservations");
    h.invoke_value_blocking(&reserved("SKU-00001", true, 100)).unwrap();
    let done = h.invoke_value_blocking(&reserved("SKU-00002", true, 300)).unwrap();
    assert_eq!(orders(&done)[0].bill.total_cents, 400);
}

#[test]
fn a_checkout_after_a_cancel_is_refused_visibly() {
    let mut h = cart("b1");
    h.invoke_value_blocking(&scan(1, "SKU-00001")).unwrap();
    h.invoke_value_blocking(&pos(2, PosAction::Cancel)).unwrap();
    let late = h.invoke_value_blocking(&pos(3, PosAction::Checkout)).unwrap();
    assert!(orders(&late).is_empty());
    assert_eq!(
        egress::<Rejected>(&late, &REJECTED)[0].reason,
        "checkout of a released basket"
    );
}

fn update(sku: &str, image: Option<&str>) -> WarehouseUpdate {
    WarehouseUpdate {
        warehouse: "w1".into(),
        sku: sku.into(),
        title: "Tea".into(),
        description: "Green tea, 100 g".into(),
        price_cents: 250,
        stock: 12,
        image: image.map(Into::into),
        multibuy: None,
        discontinued: false,
    }
}

fn intake(store: Arc<dyn ObjectStore>) -> TestHarness {
    TestHarness::new(ProductIntake::spec(), ProductIntake::new(store)).with_id("SKU-00001")
}

fn rejected(e: &Effects) -> Vec<Rejected> {
    egress(e, &REJECTED)
}

#[tokio::test]
async fn intake_processes_the_image_and_forwards_the_clean_product() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let png = generator::product_image(640, 480, [200, 30, 30]);
    store
        .put(&Path::from("incoming/SKU-00001.png"), png.into())
        .await
        .unwrap();
    let mut h = intake(store);
    let e = h
        .invoke_value(&update("SKU-00001", Some("incoming/SKU-00001.png")))
        .await
        .unwrap();
    assert!(rejected(&e).is_empty());
    let cmds = inventory_cmds(&e);
    let InventoryCmd::Upsert { product, delivered } = &cmds[0].1 else {
        panic!("expected an upsert, got {cmds:?}");
    };
    assert_eq!(*delivered, 12);
    let image = product.image.as_ref().unwrap();
    assert_eq!((image.width, image.height), (640, 480));
    // The generator's image is mostly the given colour (quantized to its bucket).
    assert_eq!(image.dominant, [0xc8, 0x18, 0x18]);
    let widths: Vec<(u32, u32)> = image.renditions.iter().map(|r| (r.width, r.height)).collect();
    assert_eq!(widths, vec![(64, 48), (256, 192), (512, 384)]);
    for r in &image.renditions {
        let file = std::fs::read(dir.path().join(&r.path)).unwrap();
        let decoded = image::load_from_memory(&file).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (r.width, r.height));
    }
}

#[tokio::test]
async fn intake_rejects_invalid_products_malformed_records_and_corrupt_images_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let mut corrupt = generator::product_image(64, 64, [0, 0, 255]);
    corrupt.truncate(corrupt.len() / 2);
    store
        .put(&Path::from("incoming/broken.png"), corrupt.into())
        .await
        .unwrap();
    store
        .put(&Path::from("incoming/notes.txt"), b"not an image".to_vec().into())
        .await
        .unwrap();
    let mut h = intake(store);
    let cases: Vec<(WarehouseUpdate, &str)> = vec![
        (update("12345", None), "invalid SKU"),
        (
            WarehouseUpdate {
                title: " ".into(),
                ..update("SKU-00001", None)
            },
            "empty title",
        ),
        (
            WarehouseUpdate {
                description: String::new(),
                ..update("SKU-00001", None)
            },
            "empty description",
        ),
        (
            WarehouseUpdate {
                price_cents: -1,
                ..update("SKU-00001", None)
            },
            "negative price",
        ),
        (
            WarehouseUpdate {
                price_cents: i64::MAX / 2,
                ..update("SKU-00001", None)
            },
            "above the limit",
        ),
        (
            WarehouseUpdate {
                stock: -3,
                ..update("SKU-00001", None)
            },
            "negative stock",
        ),
        (update("SKU-00001", Some("incoming/broken.png")), "cannot decode"),
        (update("SKU-00001", Some("incoming/notes.txt")), "unknown image format"),
        (update("SKU-00001", Some("incoming/missing.png")), "not found"),
        (update("SKU-00002", None), "is not the product's SKU"),
    ];
    for (u, reason) in cases {
        let e = h.invoke_value(&u).await.unwrap();
        let r = rejected(&e);
        assert_eq!(r.len(), 1, "{u:?}");
        assert!(r[0].reason.contains(reason), "{:?} does not say {reason}", r[0].reason);
        assert!(e.outgoing.is_empty(), "nothing reaches the inventory");
    }
    let garbage = statefun_sdk::TypedValue::from_bytes(
        <WarehouseUpdate as statefun_sdk::ValueType>::TYPE_NAME,
        b"{not json".to_vec(),
    );
    let e = h.invoke(garbage).await.unwrap();
    assert!(rejected(&e)[0].reason.contains("malformed record"));
}
