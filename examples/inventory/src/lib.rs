//! The retail reference application's functions, written against the public SDK only.
//!
//! * **inventory** (id = SKU): the region's source of truth for stock: on hand and
//!   reserved. Never lets available stock (`on_hand - reserved`) go negative.
//! * **cart** (id = basket): the checkout-counter transaction. Each scanned item is
//!   reserved at the inventory; checkout commits the reservations and pays out loyalty
//!   points; cancel or an abandon timeout releases them (a saga with compensation). The
//!   abandon timer is a delayed message whose token is re-armed by every event.
//! * **loyalty** (id = customer): points per completed purchase.
//!
//! Egress: completed orders (`retail/orders`) and low-stock alerts (`retail/alerts`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use statefun_sdk::prelude::*;

/// Function types.
pub const INVENTORY: TypeName = TypeName::from_static("retail/inventory");
/// Function types.
pub const CART: TypeName = TypeName::from_static("retail/cart");
/// Function types.
pub const LOYALTY: TypeName = TypeName::from_static("retail/loyalty");
/// Egress of completed orders.
pub const ORDERS: TypeName = TypeName::from_static("retail/orders");
/// Egress of low-stock alerts.
pub const ALERTS: TypeName = TypeName::from_static("retail/alerts");

/// An alert is emitted when available stock falls to this level or below.
pub const LOW_STOCK: i64 = 3;
/// Loyalty points per item bought.
pub const POINTS_PER_ITEM: i64 = 10;

/// Commands to an inventory address.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum InventoryCmd {
    /// Goods arrived from a warehouse.
    Restock { qty: i64 },
    /// Hold `qty` for a basket; answered with a [`CartEvent::Reserved`].
    Reserve { basket: String, qty: i64 },
    /// Return a basket's hold.
    Release { qty: i64 },
    /// The basket was paid: the held items leave the store.
    Commit { qty: i64 },
}
json_type!(InventoryCmd, "retail/InventoryCmd");

/// Stock of one SKU.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct Stock {
    /// Items in the store.
    pub on_hand: i64,
    /// Items held by open baskets.
    pub reserved: i64,
}
json_type!(Stock, "retail/Stock");

/// Events for a cart address.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum CartEvent {
    /// A counter scanned an item.
    Scan { sku: String, customer: String },
    /// The inventory's answer to a reservation.
    Reserved { sku: String, qty: i64, ok: bool },
    /// The customer pays.
    Checkout,
    /// The customer walks away at the counter.
    Cancel,
    /// The abandon timer fired.
    Abandoned,
}
json_type!(CartEvent, "retail/CartEvent");

/// Status of a basket.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BasketStatus {
    /// Scanning.
    #[default]
    Open,
    /// Checkout requested, waiting for reservation answers.
    CheckingOut,
    /// Paid.
    Completed,
    /// Cancelled or abandoned; reservations returned.
    Released,
}

/// State of one basket.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Basket {
    /// Customer id.
    pub customer: String,
    /// Reserved items per SKU.
    pub items: BTreeMap<String, i64>,
    /// Reservations asked for and not answered yet.
    pub pending: i64,
    /// Items the inventory could not reserve (out of stock).
    pub rejected: i64,
    /// Where the basket is.
    pub status: BasketStatus,
}
json_type!(Basket, "retail/Basket");

/// A completed order, for central analytics.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct OrderSummary {
    /// Basket id.
    pub basket: String,
    /// Customer id.
    pub customer: String,
    /// Items bought.
    pub items: i64,
}
json_type!(OrderSummary, "retail/OrderSummary");

/// A low-stock alert.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LowStock {
    /// The SKU.
    pub sku: String,
    /// Available items left.
    pub available: i64,
}
json_type!(LowStock, "retail/LowStock");

/// A purchase credited to a customer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Purchase {
    /// Basket id (each is credited once).
    pub basket: String,
    /// Items bought.
    pub items: i64,
}
json_type!(Purchase, "retail/Purchase");

/// Loyalty account of a customer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Account {
    /// Points earned.
    pub points: i64,
    /// Orders credited.
    pub orders: i64,
}
json_type!(Account, "retail/Account");

/// Inventory state.
pub const STOCK: ValueSpec<Stock> = ValueSpec::named("stock");
/// Cart state.
pub const BASKET: ValueSpec<Basket> = ValueSpec::named("basket");
/// Loyalty state.
pub const ACCOUNT: ValueSpec<Account> = ValueSpec::named("account");

const ABANDON_TOKEN: &str = "abandon";

/// The inventory function.
pub fn inventory(ctx: &mut Context, msg: Message) -> FunctionResult {
    let cmd: InventoryCmd = msg.decode()?;
    let mut stock = ctx.storage().get(&STOCK)?.unwrap_or_default();
    let available_before = stock.on_hand - stock.reserved;
    match cmd {
        InventoryCmd::Restock { qty } => stock.on_hand += qty,
        InventoryCmd::Reserve { basket, qty } => {
            let ok = stock.on_hand - stock.reserved >= qty;
            if ok {
                stock.reserved += qty;
            }
            let sku = ctx.self_address().id().to_owned();
            ctx.send(Address::new(CART, basket)?, &CartEvent::Reserved { sku, qty, ok })?;
        }
        InventoryCmd::Release { qty } => stock.reserved -= qty,
        InventoryCmd::Commit { qty } => {
            stock.reserved -= qty;
            stock.on_hand -= qty;
        }
    }
    if stock.on_hand < 0 || stock.reserved < 0 || stock.reserved > stock.on_hand {
        return Err(format!("stock invariant broken at {}: {stock:?}", ctx.self_address()).into());
    }
    let available = stock.on_hand - stock.reserved;
    if available <= LOW_STOCK && available_before > LOW_STOCK {
        let sku = ctx.self_address().id().to_owned();
        ctx.send_egress(ALERTS, &LowStock { sku, available })?;
    }
    ctx.storage().set(&STOCK, &stock)?;
    Ok(())
}

/// The cart function.
pub fn cart(ctx: &mut Context, msg: Message) -> FunctionResult {
    let event: CartEvent = msg.decode()?;
    let mut b = ctx.storage().get(&BASKET)?.unwrap_or_default();
    let id = ctx.self_address().id().to_owned();
    let closed = matches!(b.status, BasketStatus::Completed | BasketStatus::Released);
    match event {
        CartEvent::Scan { sku, customer } => {
            if b.status != BasketStatus::Open {
                return Ok(()); // a late scan after checkout/cancel is ignored
            }
            b.customer = customer;
            b.pending += 1;
            let reserve = InventoryCmd::Reserve {
                basket: id.clone(),
                qty: 1,
            };
            ctx.send(Address::new(INVENTORY, &sku)?, &reserve)?;
            let me = ctx.self_address().clone();
            ctx.send_after_with_token(abandon_after(), me, &CartEvent::Abandoned, ABANDON_TOKEN)?;
        }
        CartEvent::Reserved { sku, qty, ok } => {
            b.pending -= 1;
            if !ok {
                b.rejected += qty;
            } else if closed {
                // The basket closed while the reservation travelled: hand it back.
                ctx.send(Address::new(INVENTORY, &sku)?, &InventoryCmd::Release { qty })?;
            } else {
                *b.items.entry(sku).or_default() += qty;
            }
            if b.status == BasketStatus::CheckingOut && b.pending == 0 {
                complete(ctx, &id, &mut b)?;
            }
        }
        CartEvent::Checkout if b.status == BasketStatus::Open => {
            ctx.cancel_delayed(ABANDON_TOKEN);
            b.status = BasketStatus::CheckingOut;
            if b.pending == 0 {
                complete(ctx, &id, &mut b)?;
            }
        }
        CartEvent::Cancel | CartEvent::Abandoned if b.status == BasketStatus::Open => {
            ctx.cancel_delayed(ABANDON_TOKEN);
            for (sku, qty) in std::mem::take(&mut b.items) {
                ctx.send(Address::new(INVENTORY, &sku)?, &InventoryCmd::Release { qty })?;
            }
            b.status = BasketStatus::Released;
        }
        // Duplicate or late checkout/cancel/timeout events are idempotent no-ops.
        CartEvent::Checkout | CartEvent::Cancel | CartEvent::Abandoned => {}
    }
    ctx.storage().set(&BASKET, &b)?;
    Ok(())
}

fn complete(ctx: &mut Context, id: &str, b: &mut Basket) -> FunctionResult {
    let items: i64 = b.items.values().sum();
    for (sku, qty) in &b.items {
        ctx.send(Address::new(INVENTORY, sku)?, &InventoryCmd::Commit { qty: *qty })?;
    }
    if items > 0 && !b.customer.is_empty() {
        let purchase = Purchase {
            basket: id.to_owned(),
            items,
        };
        ctx.send(Address::new(LOYALTY, &b.customer)?, &purchase)?;
    }
    let summary = OrderSummary {
        basket: id.to_owned(),
        customer: b.customer.clone(),
        items,
    };
    ctx.send_egress(ORDERS, &summary)?;
    b.status = BasketStatus::Completed;
    Ok(())
}

/// The loyalty function.
pub fn loyalty(ctx: &mut Context, msg: Message) -> FunctionResult {
    let p: Purchase = msg.decode()?;
    let mut acc = ctx.storage().get(&ACCOUNT)?.unwrap_or_default();
    acc.points += p.items * POINTS_PER_ITEM;
    acc.orders += 1;
    ctx.storage().set(&ACCOUNT, &acc)?;
    Ok(())
}

fn abandon_after() -> Duration {
    Duration::from_millis(
        std::env::var("STATEFUN_DEMO_ABANDON_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1500),
    )
}

/// The application's functions.
pub fn module() -> Result<Module, statefun_sdk::ModuleError> {
    Module::builder()
        .with_fn(FunctionSpec::new(INVENTORY).with_state(STOCK), inventory)
        .with_fn(FunctionSpec::new(CART).with_state(BASKET), cart)
        .with_fn(FunctionSpec::new(LOYALTY).with_state(ACCOUNT), loyalty)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use statefun_sdk::TestHarness;

    fn scan(sku: &str) -> CartEvent {
        CartEvent::Scan {
            sku: sku.into(),
            customer: "c1".into(),
        }
    }

    #[test]
    fn inventory_refuses_to_reserve_more_than_is_available_and_alerts_once_on_low_stock() {
        let m = module().unwrap();
        let mut h = TestHarness::from_module(&m, &INVENTORY).unwrap().with_id("sku-1");
        h.invoke_value_blocking(&InventoryCmd::Restock { qty: 5 }).unwrap();
        let reserve = |qty| InventoryCmd::Reserve {
            basket: "b".into(),
            qty,
        };
        let ok = h.invoke_value_blocking(&reserve(2)).unwrap();
        let refused = h.invoke_value_blocking(&reserve(4)).unwrap();
        let answer = |e: &statefun_sdk::Effects| e.outgoing[0].message.decode::<CartEvent>().unwrap();
        assert!(matches!(answer(&ok), CartEvent::Reserved { ok: true, .. }));
        assert!(matches!(answer(&refused), CartEvent::Reserved { ok: false, .. }));
        assert_eq!(
            h.state(&STOCK).unwrap(),
            Some(Stock {
                on_hand: 5,
                reserved: 2
            })
        );
        // Available fell from 5 to 3: one alert; staying low does not repeat it.
        assert_eq!(ok.egress[0].message.decode::<LowStock>().unwrap().available, 3);
        assert!(refused.egress.is_empty());
    }

    #[test]
    fn checkout_waits_for_pending_reservations_then_commits_once() {
        let m = module().unwrap();
        let mut h = TestHarness::from_module(&m, &CART).unwrap().with_id("b1");
        h.invoke_value_blocking(&scan("s1")).unwrap();
        let early = h.invoke_value_blocking(&CartEvent::Checkout).unwrap();
        assert!(early.egress.is_empty(), "no order before the reservation is answered");
        let done = h
            .invoke_value_blocking(&CartEvent::Reserved {
                sku: "s1".into(),
                qty: 1,
                ok: true,
            })
            .unwrap();
        assert_eq!(done.egress[0].message.decode::<OrderSummary>().unwrap().items, 1);
        let again = h.invoke_value_blocking(&CartEvent::Checkout).unwrap();
        assert!(
            again.outgoing.is_empty() && again.egress.is_empty(),
            "duplicate checkout is a no-op"
        );
    }

    #[test]
    fn abandon_timer_releases_reservations_and_is_cancelled_by_checkout() {
        let m = module().unwrap();
        let mut h = TestHarness::from_module(&m, &CART).unwrap().with_id("b2");
        h.invoke_value_blocking(&scan("s1")).unwrap();
        h.invoke_value_blocking(&CartEvent::Reserved {
            sku: "s1".into(),
            qty: 1,
            ok: true,
        })
        .unwrap();
        let fired = h.advance(abandon_after());
        assert_eq!(fired.len(), 1);
        let released = h.invoke_from_blocking(None, fired[0].message.clone()).unwrap();
        assert_eq!(
            released.outgoing[0].message.decode::<InventoryCmd>().unwrap(),
            InventoryCmd::Release { qty: 1 }
        );

        let mut h = TestHarness::from_module(&m, &CART).unwrap().with_id("b3");
        h.invoke_value_blocking(&scan("s1")).unwrap();
        h.invoke_value_blocking(&CartEvent::Checkout).unwrap();
        assert!(h.pending_delayed().is_empty(), "checkout cancels the abandon timer");
    }
}
