//! The business invariants of one region, checked on a [`Snapshot`] of its state and
//! egress after the traffic stopped and every timer fired. `inventory-check FILE`
//! runs the same check on a snapshot the demo wrote (`--snapshot-dir`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::generator::Ledger;
use crate::types::*;

/// Everything the check reads about one region.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// What the generator sent.
    pub ledger: Ledger,
    /// Inventory state per SKU.
    pub stock: BTreeMap<String, Stock>,
    /// Cart state per basket.
    pub baskets: BTreeMap<String, Basket>,
    /// Loyalty state per customer.
    pub accounts: BTreeMap<String, Account>,
    /// The `retail/orders` egress.
    pub orders: Vec<OrderSummary>,
    /// The `retail/sku-windows` egress.
    pub windows: Vec<SkuWindow>,
    /// The `retail/rejected` egress.
    pub rejected: Vec<Rejected>,
    /// Messages the runtime dead-lettered (function failures).
    pub dead_letters: usize,
}

/// Checks every invariant; returns the violations (empty = PASS):
/// * for every SKU `on_hand = delivered - sold` (delivered = initial + restocked), stock
///   never negative, `reserved` = items held by open baskets;
/// * every completed basket is on the orders egress exactly once, with its bill, and
///   nothing else is;
/// * every completed basket with a customer is credited exactly once by loyalty (orders
///   and spend per customer);
/// * the analytics windows count every sale and delivery exactly once;
/// * every bad record was rejected exactly once, and the runtime dead-lettered nothing.
pub fn check(s: &Snapshot) -> Vec<String> {
    let mut v = Vec::new();
    let mut sold: BTreeMap<&str, i64> = BTreeMap::new();
    let mut held: BTreeMap<&str, i64> = BTreeMap::new();
    let mut completed: BTreeMap<&str, &Basket> = BTreeMap::new();
    for id in &s.ledger.baskets {
        let Some(b) = s.baskets.get(id) else {
            // Every basket's events were all sent (the generator drains what it held back).
            v.push(format!("basket {id} has no state: none of its counter events arrived"));
            continue;
        };
        let target = match b.status {
            BasketStatus::Completed => {
                completed.insert(id, b);
                &mut sold
            }
            BasketStatus::Open | BasketStatus::CheckingOut => &mut held,
            BasketStatus::Released | BasketStatus::Abandoned => continue,
        };
        for (sku, q) in &b.items {
            *target.entry(sku).or_default() += q;
        }
    }
    for sku in &s.ledger.skus {
        let st = s.stock.get(sku).copied().unwrap_or_default();
        let delivered = s.ledger.delivered.get(sku).copied().unwrap_or(0);
        let sold = sold.get(sku.as_str()).copied().unwrap_or(0);
        if st.on_hand != delivered - sold {
            v.push(format!(
                "{sku}: on_hand {} != delivered {delivered} - sold {sold}",
                st.on_hand
            ));
        }
        let held = held.get(sku.as_str()).copied().unwrap_or(0);
        if st.reserved != held {
            v.push(format!(
                "{sku}: reserved {} != held by open baskets {held}",
                st.reserved
            ));
        }
        if st.on_hand < 0 || st.reserved < 0 {
            v.push(format!("{sku}: negative stock {st:?}"));
        }
    }

    let mut on_egress: BTreeMap<&str, Vec<&OrderSummary>> = BTreeMap::new();
    for o in &s.orders {
        on_egress.entry(&o.basket).or_default().push(o);
    }
    for (id, b) in &completed {
        let expected = crate::functions::bill(&b.items, &b.prices, b.code.as_deref());
        if b.bill != Some(expected) {
            v.push(format!(
                "basket {id}: bill {:?}, its items and prices make {expected:?}",
                b.bill
            ));
        }
        match on_egress.get(id).map(Vec::as_slice) {
            Some([o]) if Some(o.bill) == b.bill => {}
            Some([o]) => v.push(format!(
                "order {id}: egress bill {:?} != basket bill {:?}",
                o.bill, b.bill
            )),
            other => v.push(format!(
                "order {id} is on the orders egress {} times",
                other.map_or(0, <[_]>::len)
            )),
        }
    }
    for id in on_egress.keys() {
        if !completed.contains_key(id) {
            v.push(format!("order {id} is on the egress but its basket is not completed"));
        }
    }

    let mut per_customer: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for b in completed.values().filter(|b| !b.customer.is_empty()) {
        let e = per_customer.entry(&b.customer).or_default();
        e.0 += 1;
        e.1 += b.bill.map_or(0, |b| b.total_cents);
    }
    for (customer, acc) in &s.accounts {
        let (orders, spend) = per_customer.get(customer.as_str()).copied().unwrap_or((0, 0));
        if (acc.orders, acc.spend_cents) != (orders, spend) {
            v.push(format!(
                "loyalty {customer}: credited {} orders / {} cents, completed {orders} / {spend}",
                acc.orders, acc.spend_cents
            ));
        }
    }
    for customer in per_customer.keys() {
        if !s.accounts.contains_key(*customer) {
            v.push(format!("loyalty {customer}: completed orders but no account"));
        }
    }

    // Revenue per SKU at the prices the bills charged (before discounts).
    let mut gross: BTreeMap<&str, i64> = BTreeMap::new();
    for b in completed.values() {
        for (sku, q) in &b.items {
            *gross.entry(sku).or_default() += q * b.prices.get(sku).map_or(0, |p| p.0);
        }
    }
    let mut windows: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for w in &s.windows {
        if !seen.insert((&w.sku, w.seq)) {
            v.push(format!("analytics window {} #{} appears twice", w.sku, w.seq));
        }
        let e = windows.entry(&w.sku).or_default();
        e.0 += w.sold;
        e.1 += w.delivered;
        e.2 += w.revenue_cents;
    }
    for sku in &s.ledger.skus {
        let (w_sold, w_delivered, w_revenue) = windows.get(sku.as_str()).copied().unwrap_or_default();
        let sold = sold.get(sku.as_str()).copied().unwrap_or(0);
        let delivered = s.ledger.delivered.get(sku).copied().unwrap_or(0);
        let revenue = gross.get(sku.as_str()).copied().unwrap_or(0);
        if (w_sold, w_delivered, w_revenue) != (sold, delivered, revenue) {
            v.push(format!(
                "analytics {sku}: windows count {w_sold} sold / {w_delivered} delivered / {w_revenue} cents, \
                 the region {sold} / {delivered} / {revenue}"
            ));
        }
    }

    let intake = s.rejected.iter().filter(|r| r.function == "product-intake").count() as u64;
    if intake != s.ledger.bad_records {
        v.push(format!(
            "{intake} records rejected by product-intake, {} bad records sent",
            s.ledger.bad_records
        ));
    }
    // The generator sends no other bad input: any other refusal is a lost operation
    // (e.g. a checkout that arrived after its basket was abandoned).
    for r in s.rejected.iter().filter(|r| r.function != "product-intake") {
        v.push(format!("{} refused {}: {}", r.function, r.key, r.reason));
    }
    if s.dead_letters > 0 {
        v.push(format!("{} messages dead-lettered by the runtime", s.dead_letters));
    }
    v
}

/// Prints the verdict on `failures` (the first 20 of them): `invariant check: PASS` or
/// `FAIL` with what broke. Returns whether it passed.
pub fn print_verdict(failures: &[String]) -> bool {
    if failures.is_empty() {
        println!("invariant check: PASS");
        return true;
    }
    println!("invariant check: FAIL");
    for f in failures.iter().take(20) {
        println!("  - {f}");
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consistent() -> Snapshot {
        let basket = Basket {
            customer: "c1".into(),
            items: [("SKU-00001".to_string(), 2)].into(),
            prices: [("SKU-00001".to_string(), (100, None))].into(),
            status: BasketStatus::Completed,
            bill: Some(Bill {
                items: 2,
                gross_cents: 200,
                discount_cents: 0,
                total_cents: 200,
            }),
            ..Default::default()
        };
        Snapshot {
            ledger: Ledger {
                region: "r".into(),
                skus: vec!["SKU-00001".into()],
                delivered: [("SKU-00001".to_string(), 10)].into(),
                baskets: vec!["b1".into()],
                customers: vec!["c1".into()],
                bad_records: 1,
                counts: Default::default(),
            },
            stock: [(
                "SKU-00001".to_string(),
                Stock {
                    on_hand: 8,
                    reserved: 0,
                },
            )]
            .into(),
            orders: vec![OrderSummary {
                region: "r".into(),
                store: "s".into(),
                basket: "b1".into(),
                customer: "c1".into(),
                bill: basket.bill.unwrap(),
            }],
            baskets: [("b1".to_string(), basket)].into(),
            accounts: [(
                "c1".to_string(),
                Account {
                    orders: 1,
                    spend_cents: 200,
                    ..Default::default()
                },
            )]
            .into(),
            windows: vec![SkuWindow {
                region: "r".into(),
                sku: "SKU-00001".into(),
                seq: 0,
                sold: 2,
                revenue_cents: 200,
                delivered: 10,
                on_hand: 8,
            }],
            rejected: vec![Rejected {
                function: "product-intake".into(),
                key: "k".into(),
                reason: "bad".into(),
            }],
            dead_letters: 0,
        }
    }

    #[test]
    fn the_check_passes_a_consistent_region_and_names_each_broken_invariant() {
        assert_eq!(check(&consistent()), Vec::<String>::new());
        type Breaker = fn(&mut Snapshot);
        let broken: Vec<(Breaker, &str)> = vec![
            (|s| s.stock.get_mut("SKU-00001").unwrap().on_hand = 9, "on_hand"),
            (|s| s.stock.get_mut("SKU-00001").unwrap().reserved = 1, "reserved"),
            (|s| s.orders.push(s.orders[0].clone()), "2 times"),
            (|s| s.orders.clear(), "0 times"),
            (|s| s.accounts.get_mut("c1").unwrap().orders = 2, "loyalty c1"),
            (|s| s.accounts.clear(), "no account"),
            (|s| s.windows.push(s.windows[0].clone()), "appears twice"),
            (|s| s.windows[0].sold = 1, "analytics SKU-00001"),
            (|s| s.windows[0].revenue_cents = 190, "analytics SKU-00001"),
            (|s| s.rejected.clear(), "records rejected"),
            (|s| s.dead_letters = 1, "dead-lettered"),
            (|s| s.baskets.clear(), "basket b1 has no state"),
            (
                |s| {
                    s.baskets
                        .get_mut("b1")
                        .unwrap()
                        .prices
                        .insert("SKU-00001".into(), (90, None));
                },
                "its items and prices make",
            ),
            (
                |s| {
                    s.rejected.push(Rejected {
                        function: "cart".into(),
                        key: "b2".into(),
                        reason: "checkout of a released basket".into(),
                    })
                },
                "cart refused b2",
            ),
        ];
        for (breakit, says) in broken {
            let mut s = consistent();
            breakit(&mut s);
            let v = check(&s);
            assert!(v.iter().any(|m| m.contains(says)), "expected {says:?} in {v:?}");
        }
    }
}
