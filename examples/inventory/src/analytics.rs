//! Central analytics: the consumer of every region's analytics egress
//! (`retail/orders`, `retail/sku-windows`) and the global view it keeps: stock by
//! region, top SKUs, revenue.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::types::{OrderSummary, SkuWindow};

/// The global view across regions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GlobalView {
    /// Latest known on-hand per (region, SKU): from the SKU's newest window.
    latest: BTreeMap<(String, String), (u64, i64)>,
    /// Items sold per SKU, all regions.
    sold: BTreeMap<String, i64>,
    /// Orders and revenue (paid, in cents) per region.
    revenue: BTreeMap<String, (u64, i64)>,
    /// Windows and orders taken, by key: a record delivered twice (at-least-once egress)
    /// counts once.
    seen_windows: BTreeSet<(String, String, u64)>,
    seen_orders: BTreeSet<(String, String)>,
}

impl GlobalView {
    /// An empty view.
    pub fn new() -> GlobalView {
        GlobalView::default()
    }

    /// Takes one per-SKU window of a region.
    pub fn add_window(&mut self, w: &SkuWindow) {
        if !self.seen_windows.insert((w.region.clone(), w.sku.clone(), w.seq)) {
            return;
        }
        let slot = self
            .latest
            .entry((w.region.clone(), w.sku.clone()))
            .or_insert((w.seq, w.on_hand));
        if w.seq >= slot.0 {
            *slot = (w.seq, w.on_hand);
        }
        *self.sold.entry(w.sku.clone()).or_default() += w.sold;
    }

    /// Takes one completed order of a region.
    pub fn add_order(&mut self, o: &OrderSummary) {
        if !self.seen_orders.insert((o.region.clone(), o.basket.clone())) {
            return;
        }
        let r = self.revenue.entry(o.region.clone()).or_default();
        r.0 += 1;
        r.1 += o.bill.total_cents;
    }

    /// Items on hand per region.
    pub fn stock_by_region(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for ((region, _), (_, on_hand)) in &self.latest {
            *out.entry(region.clone()).or_default() += on_hand;
        }
        out
    }

    /// The `n` best-selling SKUs across regions (ties by SKU).
    pub fn top_skus(&self, n: usize) -> Vec<(String, i64)> {
        let mut v: Vec<(String, i64)> = self.sold.iter().map(|(s, n)| (s.clone(), *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    /// Orders and revenue in cents per region.
    pub fn revenue_by_region(&self) -> &BTreeMap<String, (u64, i64)> {
        &self.revenue
    }

    /// A printable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "central analytics (global view):");
        let stock = self.stock_by_region();
        for (region, (orders, cents)) in &self.revenue {
            let _ = writeln!(
                s,
                "  {region:<8} orders {orders:>7}  revenue {:>12.2}  stock on hand {:>7}",
                *cents as f64 / 100.0,
                stock.get(region).copied().unwrap_or(0)
            );
        }
        let (orders, cents): (u64, i64) = self.revenue.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let _ = writeln!(
            s,
            "  {:<8} orders {orders:>7}  revenue {:>12.2}",
            "all",
            cents as f64 / 100.0
        );
        let top: Vec<String> = self.top_skus(5).iter().map(|(s, n)| format!("{s} ({n})")).collect();
        let _ = writeln!(s, "  top SKUs by items sold: {}", top.join(", "));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Bill;

    fn window(region: &str, sku: &str, seq: u64, sold: i64, on_hand: i64) -> SkuWindow {
        SkuWindow {
            region: region.into(),
            sku: sku.into(),
            seq,
            sold,
            revenue_cents: 0,
            delivered: 0,
            on_hand,
        }
    }

    #[test]
    fn the_view_keeps_the_newest_stock_per_region_and_sums_sales_and_revenue_once_per_record() {
        let mut v = GlobalView::new();
        v.add_window(&window("north", "SKU-00001", 1, 3, 7));
        v.add_window(&window("north", "SKU-00001", 0, 2, 10)); // arrives late
        v.add_window(&window("south", "SKU-00001", 0, 1, 4));
        v.add_window(&window("south", "SKU-00002", 0, 9, 1));
        let bill = Bill {
            items: 1,
            gross_cents: 500,
            discount_cents: 0,
            total_cents: 500,
        };
        for (region, basket) in [("north", "b1"), ("north", "b2"), ("south", "b1"), ("north", "b1")] {
            v.add_order(&OrderSummary {
                region: region.into(),
                store: "s".into(),
                basket: basket.into(),
                customer: String::new(),
                bill,
            });
        }
        // Delivered twice (at-least-once egress): counted once.
        v.add_window(&window("south", "SKU-00002", 0, 9, 1));
        assert_eq!(
            v.stock_by_region(),
            [("north".to_string(), 7), ("south".to_string(), 5)].into()
        );
        assert_eq!(
            v.top_skus(2),
            vec![("SKU-00002".to_string(), 9), ("SKU-00001".to_string(), 6)]
        );
        assert_eq!(v.revenue_by_region()["north"], (2, 1000));
        assert!(
            v.render()
                .contains("top SKUs by items sold: SKU-00002 (9), SKU-00001 (6)")
        );
    }
}
