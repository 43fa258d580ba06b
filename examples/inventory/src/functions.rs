//! The stateful functions: inventory (id = SKU), cart (id = basket), loyalty
//! (id = customer).

use std::time::Duration;

use statefun_sdk::prelude::*;

use crate::types::*;
use crate::{ALERTS, AppConfig, CART, INVENTORY, LOYALTY, ORDERS, REJECTED, SKU_WINDOWS};

/// Inventory state: stock.
pub const STOCK: ValueSpec<Stock> = ValueSpec::named("stock");
/// Inventory state: the product record.
pub const PRODUCT: ValueSpec<Product> = ValueSpec::named("product");
/// Inventory state: the analytics window being filled.
pub const WINDOW: ValueSpec<WindowAcc> = ValueSpec::named("window");
/// Cart state.
pub const BASKET: ValueSpec<Basket> = ValueSpec::named("basket");
/// Loyalty state.
pub const ACCOUNT: ValueSpec<Account> = ValueSpec::named("account");

/// An alert is emitted when available stock falls to this level or below.
pub const LOW_STOCK: i64 = 3;
/// Out-of-order counter events a basket holds back at most; beyond, the event is
/// refused (the counter is misbehaving).
pub const MAX_EARLY_EVENTS: usize = 64;
/// Baskets a loyalty account remembers to credit each once.
const RECENT_BASKETS: usize = 32;

const ABANDON_TOKEN: &str = "abandon";
const WINDOW_TOKEN: &str = "window";

/// Promotion codes and their percentage off the bill.
pub const CODES: &[(&str, i64)] = &[("SAVE10", 10), ("STAFF20", 20)];

/// The inventory function: the region's source of truth for a SKU.
pub fn inventory(ctx: &mut Context, msg: Message, config: &AppConfig) -> FunctionResult {
    let cmd: InventoryCmd = match msg.decode() {
        Ok(c) => c,
        Err(e) => {
            let sku = ctx.self_address().id().to_owned();
            return reject(ctx, "inventory", &sku, format!("malformed command: {e}"));
        }
    };
    let mut stock = ctx.storage().get(&STOCK)?.unwrap_or_default();
    let mut window = ctx.storage().get(&WINDOW)?.unwrap_or_default();
    let available_before = stock.on_hand - stock.reserved;
    let sku = ctx.self_address().id().to_owned();
    match cmd {
        InventoryCmd::Upsert { mut product, delivered } => {
            if product.image.is_none()
                && let Some(old) = ctx.storage().get(&PRODUCT)?
            {
                product.image = old.image;
            }
            ctx.storage().set(&PRODUCT, &product)?;
            stock.on_hand += delivered;
            window.delivered += delivered;
        }
        InventoryCmd::Reserve { basket, qty } => {
            let product = ctx.storage().get(&PRODUCT)?;
            let sellable = product.as_ref().is_some_and(|p| !p.discontinued);
            let ok = sellable && qty > 0 && stock.on_hand - stock.reserved >= qty;
            if ok {
                stock.reserved += qty;
            }
            let reply = CartEvent::Reserved {
                sku: sku.clone(),
                qty,
                ok,
                price_cents: product.as_ref().map_or(0, |p| p.price_cents),
                multibuy: product.as_ref().and_then(|p| p.multibuy),
            };
            ctx.send(Address::new(CART, basket)?, &reply)?;
        }
        InventoryCmd::Release { qty } => stock.reserved -= qty,
        InventoryCmd::Commit { qty, price_cents } => {
            stock.reserved -= qty;
            stock.on_hand -= qty;
            window.sold += qty;
            window.revenue_cents += qty * price_cents;
        }
        InventoryCmd::FlushWindow => {
            let record = SkuWindow {
                region: config.region.clone(),
                sku,
                seq: window.seq,
                sold: window.sold,
                revenue_cents: window.revenue_cents,
                delivered: window.delivered,
                on_hand: stock.on_hand,
            };
            ctx.send_egress(SKU_WINDOWS, &record)?;
            window = WindowAcc {
                seq: window.seq + 1,
                ..Default::default()
            };
            ctx.storage().set(&WINDOW, &window)?;
            return Ok(());
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
    if !window.open && (window.sold != 0 || window.delivered != 0) {
        window.open = true;
        let me = ctx.self_address().clone();
        ctx.send_after_with_token(config.window, me, &InventoryCmd::FlushWindow, WINDOW_TOKEN)?;
    }
    ctx.storage().set(&WINDOW, &window)?;
    ctx.storage().set(&STOCK, &stock)?;
    Ok(())
}

/// The cart function: a basket at a checkout counter, as a saga. Reservations are
/// compensated by releases when the basket is cancelled, abandoned or emptied.
pub fn cart(ctx: &mut Context, msg: Message, config: &AppConfig) -> FunctionResult {
    let mut b = ctx.storage().get(&BASKET)?.unwrap_or_default();
    let id = ctx.self_address().id().to_owned();
    if msg.is::<PosEvent>() {
        let event: PosEvent = match msg.decode() {
            Ok(e) => e,
            Err(e) => return reject(ctx, "cart", &id, format!("malformed counter event: {e}")),
        };
        if b.next_seq == 0 {
            b.next_seq = 1;
            b.store = event.store.clone();
        }
        if event.seq < b.next_seq || b.early.contains_key(&event.seq) {
            return Ok(()); // a duplicate from the counter
        }
        if event.seq > b.next_seq {
            if b.early.len() >= MAX_EARLY_EVENTS {
                let reason = format!(
                    "counter event {} is more than {MAX_EARLY_EVENTS} events ahead of {}",
                    event.seq, b.next_seq
                );
                return reject(ctx, "cart", &id, reason);
            }
            b.early.insert(event.seq, event.action);
        } else {
            apply(ctx, &id, &mut b, event.action, config)?;
            b.next_seq += 1;
            while let Some(action) = b.early.remove(&b.next_seq) {
                apply(ctx, &id, &mut b, action, config)?;
                b.next_seq += 1;
            }
        }
        if b.status == BasketStatus::Open {
            let me = ctx.self_address().clone();
            ctx.send_after_with_token(config.abandon_after, me, &CartEvent::Abandoned, ABANDON_TOKEN)?;
        }
    } else {
        let event = match msg.decode::<CartEvent>() {
            Ok(e) => e,
            Err(e) => return reject(ctx, "cart", &id, format!("unexpected message {}: {e}", msg.type_name())),
        };
        match event {
            CartEvent::Reserved {
                sku,
                qty,
                ok,
                price_cents,
                multibuy,
            } => {
                if b.pending.get(&sku).copied().unwrap_or(0) < qty {
                    // A reply this basket is not waiting for (a duplicate): hand back
                    // what it reserved, keep nothing.
                    if ok && let Ok(inventory) = Address::new(INVENTORY, &sku) {
                        ctx.send(inventory, &InventoryCmd::Release { qty })?;
                    }
                    return Ok(());
                }
                let pending = b.pending.entry(sku.clone()).or_default();
                *pending -= qty;
                if *pending <= 0 {
                    b.pending.remove(&sku);
                }
                let removal = b.removals.get(&sku).copied().unwrap_or(0);
                if !ok {
                    b.rejected += qty;
                    if removal > 0 {
                        // The item taken back was one the inventory refused anyway.
                        decrement(&mut b.removals, &sku, qty.min(removal));
                    }
                } else if b.status == BasketStatus::Abandoned && removal == 0 {
                    // Asked for before the basket was abandoned: hand it back, and ask
                    // again if the counter comes back.
                    ctx.send(Address::new(INVENTORY, &sku)?, &InventoryCmd::Release { qty })?;
                    *b.abandoned.entry(sku).or_default() += qty;
                } else if !matches!(b.status, BasketStatus::Open | BasketStatus::CheckingOut) || removal > 0 {
                    // The basket closed, or the item was taken back, while the
                    // reservation travelled: hand it back.
                    if removal > 0 {
                        decrement(&mut b.removals, &sku, qty.min(removal));
                    }
                    ctx.send(Address::new(INVENTORY, &sku)?, &InventoryCmd::Release { qty })?;
                } else {
                    *b.items.entry(sku.clone()).or_default() += qty;
                    b.prices.insert(sku, (price_cents, multibuy));
                }
                if b.status == BasketStatus::CheckingOut && b.pending.is_empty() {
                    complete(ctx, &id, &mut b, config)?;
                }
            }
            CartEvent::Abandoned if b.status == BasketStatus::Open => abandon(ctx, &mut b)?,
            // A late timer (the basket closed meanwhile) is a no-op.
            CartEvent::Abandoned => {}
        }
    }
    ctx.storage().set(&BASKET, &b)?;
    Ok(())
}

/// Applies one in-order counter event.
fn apply(ctx: &mut Context, id: &str, b: &mut Basket, action: PosAction, config: &AppConfig) -> FunctionResult {
    if b.status == BasketStatus::Abandoned {
        // The counter went quiet for `abandon_after` (processing time: a slow partition
        // looks the same) and came back: reserve what the basket held again.
        b.status = BasketStatus::Open;
        for (sku, qty) in std::mem::take(&mut b.abandoned) {
            *b.pending.entry(sku.clone()).or_default() += qty;
            let reserve = InventoryCmd::Reserve {
                basket: id.to_owned(),
                qty,
            };
            ctx.send(Address::new(INVENTORY, &sku)?, &reserve)?;
        }
    }
    if b.status == BasketStatus::Released && action == PosAction::Checkout {
        // The basket was cancelled (or checked out empty) before: the sale is refused
        // visibly, never dropped.
        return reject(ctx, "cart", id, "checkout of a released basket".to_owned());
    }
    if b.status != BasketStatus::Open {
        return Ok(()); // a late event after checkout or cancel changes nothing
    }
    match action {
        PosAction::Scan { sku, customer } => {
            if !customer.is_empty() {
                b.customer = customer;
            }
            let Ok(inventory) = Address::new(INVENTORY, &sku) else {
                return reject(ctx, "cart", id, "scan without a SKU".to_owned());
            };
            *b.pending.entry(sku.clone()).or_default() += 1;
            let reserve = InventoryCmd::Reserve {
                basket: id.to_owned(),
                qty: 1,
            };
            ctx.send(inventory, &reserve)?;
        }
        PosAction::Remove { sku } => {
            if b.items.get(&sku).copied().unwrap_or(0) > 0 {
                decrement(&mut b.items, &sku, 1);
                ctx.send(Address::new(INVENTORY, &sku)?, &InventoryCmd::Release { qty: 1 })?;
            } else if b.pending.get(&sku).copied().unwrap_or(0) > b.removals.get(&sku).copied().unwrap_or(0) {
                *b.removals.entry(sku).or_default() += 1;
            }
            // Removing an item that is not in the basket changes nothing.
        }
        PosAction::Code { code } => {
            if CODES.iter().any(|(c, _)| *c == code) {
                b.code = Some(code);
            }
        }
        PosAction::Checkout => {
            ctx.cancel_delayed(ABANDON_TOKEN);
            b.status = BasketStatus::CheckingOut;
            // Completes when the last reservation is answered (maybe right away).
            if b.pending.is_empty() {
                complete(ctx, id, b, config)?;
            }
        }
        PosAction::Cancel => release_all(ctx, b)?,
    }
    Ok(())
}

fn decrement(map: &mut std::collections::BTreeMap<String, i64>, key: &str, by: i64) {
    if let Some(v) = map.get_mut(key) {
        *v -= by;
        if *v <= 0 {
            map.remove(key);
        }
    }
}

/// The abandon timer fired: every reserved item goes back to the inventory, and the
/// basket remembers them in case the counter comes back (reservations still travelling
/// are handed back and remembered when they arrive).
fn abandon(ctx: &mut Context, b: &mut Basket) -> FunctionResult {
    let held = b.items.clone();
    release_all(ctx, b)?;
    b.status = BasketStatus::Abandoned;
    b.abandoned = held;
    Ok(())
}

fn release_all(ctx: &mut Context, b: &mut Basket) -> FunctionResult {
    ctx.cancel_delayed(ABANDON_TOKEN);
    for (sku, qty) in std::mem::take(&mut b.items) {
        ctx.send(Address::new(INVENTORY, &sku)?, &InventoryCmd::Release { qty })?;
    }
    b.status = BasketStatus::Released;
    Ok(())
}

/// The bill of `items` at `prices` with promotion `code`.
pub fn bill(
    items: &std::collections::BTreeMap<String, i64>,
    prices: &std::collections::BTreeMap<String, (i64, Option<MultiBuy>)>,
    code: Option<&str>,
) -> Bill {
    let mut gross = 0;
    let mut multibuy_off = 0;
    for (sku, qty) in items {
        let (price, offer) = prices.get(sku).copied().unwrap_or((0, None));
        gross += price * qty;
        if let Some(MultiBuy { buy, pay }) = offer
            && buy > pay
            && pay >= 0
        {
            multibuy_off += (qty / buy) * (buy - pay) * price;
        }
    }
    let pct = code
        .and_then(|c| CODES.iter().find(|(k, _)| *k == c))
        .map_or(0, |(_, p)| *p);
    let code_off = (gross - multibuy_off) * pct / 100;
    let discount = multibuy_off + code_off;
    Bill {
        items: items.values().sum(),
        gross_cents: gross,
        discount_cents: discount,
        total_cents: gross - discount,
    }
}

fn complete(ctx: &mut Context, id: &str, b: &mut Basket, config: &AppConfig) -> FunctionResult {
    if b.items.is_empty() {
        // Nothing to pay (empty, or everything refused or taken back): the basket
        // closes without an order.
        b.status = BasketStatus::Released;
        return Ok(());
    }
    for (sku, qty) in &b.items {
        let price_cents = b.prices.get(sku).map_or(0, |p| p.0);
        let commit = InventoryCmd::Commit { qty: *qty, price_cents };
        ctx.send(Address::new(INVENTORY, sku)?, &commit)?;
    }
    let bill = bill(&b.items, &b.prices, b.code.as_deref());
    if !b.customer.is_empty() {
        let purchase = Purchase {
            basket: id.to_owned(),
            lines: b.items.clone(),
            total_cents: bill.total_cents,
        };
        ctx.send(Address::new(LOYALTY, &b.customer)?, &purchase)?;
    }
    let summary = OrderSummary {
        region: config.region.clone(),
        store: b.store.clone(),
        basket: id.to_owned(),
        customer: b.customer.clone(),
        bill,
    };
    ctx.send_egress(ORDERS, &summary)?;
    b.bill = Some(bill);
    b.status = BasketStatus::Completed;
    Ok(())
}

/// Sends a refused record to the application's dead-letter egress.
pub(crate) fn reject(ctx: &mut Context, function: &str, key: &str, reason: String) -> FunctionResult {
    let record = Rejected {
        function: function.to_owned(),
        key: key.to_owned(),
        reason,
    };
    ctx.send_egress(REJECTED, &record)?;
    Ok(())
}

/// Points per euro paid, by tier.
pub fn points_per_euro(tier: Tier) -> i64 {
    match tier {
        Tier::Bronze => 1,
        Tier::Silver => 2,
        Tier::Gold => 3,
    }
}

/// The tier for a lifetime spend.
pub fn tier_for(spend_cents: i64) -> Tier {
    match spend_cents {
        s if s >= 100_000 => Tier::Gold,
        s if s >= 20_000 => Tier::Silver,
        _ => Tier::Bronze,
    }
}

/// The loyalty function: points, tier, purchase history and a recommendation.
pub fn loyalty(ctx: &mut Context, msg: Message) -> FunctionResult {
    let p: Purchase = msg.decode()?;
    let mut acc = ctx.storage().get(&ACCOUNT)?.unwrap_or_default();
    if acc.recent.contains(&p.basket) {
        return Ok(()); // credited already
    }
    acc.points += p.total_cents / 100 * points_per_euro(acc.tier);
    acc.orders += 1;
    acc.spend_cents += p.total_cents;
    acc.tier = tier_for(acc.spend_cents);
    for (sku, qty) in &p.lines {
        *acc.bought.entry(sku.clone()).or_default() += qty;
    }
    acc.recent.push(p.basket);
    if acc.recent.len() > RECENT_BASKETS {
        acc.recent.remove(0);
    }
    acc.recommendation = acc
        .bought
        .iter()
        .filter(|(sku, _)| !p.lines.contains_key(*sku))
        .max_by_key(|(sku, n)| (**n, std::cmp::Reverse((*sku).clone())))
        .map(|(sku, _)| sku.clone());
    ctx.storage().set(&ACCOUNT, &acc)?;
    Ok(())
}

/// The default time after the last counter event at which an open basket is abandoned.
pub const DEFAULT_ABANDON_AFTER: Duration = Duration::from_millis(1500);
