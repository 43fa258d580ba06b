//! The load generator: one region's warehouses, stores, checkout counters and
//! customers. It produces the records of the `warehouse-updates` and `pos-events`
//! topics (as addressed messages, so the demo can feed them in-process and a Kafka
//! producer can write them), including duplicates, reordered events and bad records
//! at configurable ratios, and keeps the [`Ledger`] the invariant check needs.

use std::collections::{BTreeMap, VecDeque};
use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use statefun_sdk::{Address, TypedValue, ValueType};

use crate::types::*;
use crate::{CART, INTAKE};

/// The shape and mix of one region's traffic.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Region name (prefix of its ids).
    pub region: String,
    /// SKUs in the region's range.
    pub skus: usize,
    /// Stores.
    pub stores: usize,
    /// Checkout counters per store.
    pub counters_per_store: usize,
    /// Customers with a loyalty card.
    pub customers: usize,
    /// Warehouses delivering to the region.
    pub warehouses: usize,
    /// Items each SKU starts with.
    pub initial_stock: i64,
    /// Share of baskets walked away from (released by the abandon timer).
    pub abandon_ratio: f64,
    /// Share of baskets cancelled at the counter.
    pub cancel_ratio: f64,
    /// Share of generated records that are bad (malformed, invalid product, corrupt
    /// image, unknown SKU).
    pub bad_ratio: f64,
    /// Share of counter events sent twice.
    pub duplicate_ratio: f64,
    /// Share of counter events swapped with the next one of their basket.
    pub reorder_ratio: f64,
    /// Product image size in pixels.
    pub image_size: (u32, u32),
    /// Random seed.
    pub seed: u64,
}

impl LoadConfig {
    /// A small region: 40 SKUs, 3 stores with 4 counters, 300 customers.
    pub fn new(region: impl Into<String>, seed: u64) -> LoadConfig {
        LoadConfig {
            region: region.into(),
            skus: 40,
            stores: 3,
            counters_per_store: 4,
            customers: 300,
            warehouses: 2,
            initial_stock: 60,
            abandon_ratio: 0.08,
            cancel_ratio: 0.08,
            bad_ratio: 0.01,
            duplicate_ratio: 0.02,
            reorder_ratio: 0.02,
            image_size: (320, 240),
            seed,
        }
    }

    /// Why this configuration cannot generate traffic, if it cannot: SKU ids have five
    /// digits, every count must be positive, every share a probability (the shares of
    /// baskets together at most 1).
    pub fn validate(&self) -> Result<(), String> {
        if self.skus == 0 || self.skus >= 100_000 {
            return Err(format!(
                "skus must be 1 to 99999 (SKU ids have five digits), not {}",
                self.skus
            ));
        }
        for (what, n) in [
            ("stores", self.stores),
            ("counters per store", self.counters_per_store),
            ("customers", self.customers),
            ("warehouses", self.warehouses),
        ] {
            if n == 0 {
                return Err(format!("{what} must be at least 1"));
            }
        }
        for (what, p) in [
            ("abandon ratio", self.abandon_ratio),
            ("cancel ratio", self.cancel_ratio),
            ("bad-record ratio", self.bad_ratio),
            ("duplicate ratio", self.duplicate_ratio),
            ("reorder ratio", self.reorder_ratio),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{what} must be between 0 and 1, not {p}"));
            }
        }
        if self.abandon_ratio + self.cancel_ratio > 1.0 {
            return Err("abandon ratio and cancel ratio add up to more than 1".into());
        }
        if self.image_size.0 == 0 || self.image_size.1 == 0 {
            return Err("the product images need a size".into());
        }
        Ok(())
    }
}

/// One generated record: where it goes and what it carries.
#[derive(Debug, Clone)]
pub struct Event {
    /// The function address (the topic's key becomes the id).
    pub target: Address,
    /// The record (bad records carry undecodable bytes).
    pub value: TypedValue,
}

/// What the generator sent that the invariant check needs.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Ledger {
    /// Region.
    pub region: String,
    /// The region's SKUs.
    pub skus: Vec<String>,
    /// Items delivered per SKU by valid warehouse updates (initial stock included).
    pub delivered: BTreeMap<String, i64>,
    /// Every basket id opened.
    pub baskets: Vec<String>,
    /// Customers who showed a loyalty card.
    pub customers: Vec<String>,
    /// Bad records product-intake must reject, each once.
    pub bad_records: u64,
    /// Records generated, by kind.
    pub counts: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct OpenBasket {
    id: String,
    store: String,
    counter: String,
    customer: String,
    seq: u32,
    scans_left: u32,
    scanned: Vec<String>,
    end: End,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    Checkout,
    Cancel,
    Abandon,
}

/// The generator of one region.
#[derive(Debug)]
pub struct Generator {
    cfg: LoadConfig,
    rng: StdRng,
    counters: Vec<Option<OpenBasket>>,
    queue: VecDeque<Event>,
    ledger: Ledger,
    customers_seen: std::collections::BTreeSet<String>,
}

/// A product image: the given colour with a darker band along the bottom (PNG).
pub fn product_image(width: u32, height: u32, colour: [u8; 3]) -> Vec<u8> {
    let band = height - height / 8;
    let img = RgbImage::from_fn(width, height, |x, y| {
        if y >= band {
            let shade = (x * 255 / width.max(1)) as u8;
            Rgb([shade / 4, shade / 4, shade / 4])
        } else {
            Rgb(colour)
        }
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)
        .expect("PNG encoding to memory");
    out.into_inner()
}

impl Generator {
    /// A generator for `cfg`.
    pub fn new(cfg: LoadConfig) -> Generator {
        let counters = (0..cfg.stores * cfg.counters_per_store).map(|_| None).collect();
        let ledger = Ledger {
            region: cfg.region.clone(),
            skus: (0..cfg.skus).map(sku).collect(),
            ..Default::default()
        };
        Generator {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            counters,
            queue: VecDeque::new(),
            ledger,
            customers_seen: Default::default(),
        }
    }

    /// What was sent so far.
    pub fn ledger(&self) -> Ledger {
        let mut l = self.ledger.clone();
        l.customers = self.customers_seen.iter().cloned().collect();
        l
    }

    /// Writes the product images (and one corrupt image) to `store` and returns the
    /// first warehouse update of every SKU: the range and its initial stock.
    pub async fn setup(&mut self, store: &dyn ObjectStore) -> Result<Vec<Event>, object_store::Error> {
        let (w, h) = self.cfg.image_size;
        let mut events = Vec::new();
        for i in 0..self.cfg.skus {
            let s = sku(i);
            let colour = [
                self.rng.random_range(0..=255),
                self.rng.random_range(0..=255),
                self.rng.random_range(0..=255),
            ];
            let path = format!("incoming/{}/{s}.png", self.cfg.region);
            store
                .put(&Path::from(path.as_str()), product_image(w, h, colour).into())
                .await?;
            let mut u = self.product(&s, self.cfg.initial_stock);
            u.image = Some(path);
            events.push(self.warehouse_event(u, true));
        }
        let mut corrupt = product_image(w, h, [0, 0, 0]);
        corrupt.truncate(corrupt.len() / 3);
        store
            .put(&Path::from(self.corrupt_image_path().as_str()), corrupt.into())
            .await?;
        Ok(events)
    }

    fn corrupt_image_path(&self) -> String {
        format!("incoming/{}/corrupt.png", self.cfg.region)
    }

    fn product(&mut self, s: &str, stock: i64) -> WarehouseUpdate {
        let i: usize = s[4..].parse().unwrap_or(0);
        WarehouseUpdate {
            warehouse: format!(
                "{}-W{}",
                self.cfg.region,
                self.rng.random_range(0..self.cfg.warehouses.max(1))
            ),
            sku: s.to_owned(),
            title: format!("Product {i}"),
            description: format!("Product {i} of the regional range"),
            price_cents: 99 + (i as i64 * 37) % 2000,
            stock,
            image: None,
            multibuy: i.is_multiple_of(5).then_some(MultiBuy { buy: 3, pay: 2 }),
            discontinued: false,
        }
    }

    fn warehouse_event(&mut self, u: WarehouseUpdate, valid: bool) -> Event {
        if valid {
            *self.ledger.delivered.entry(u.sku.clone()).or_default() += u.stock;
            self.count("warehouse-update");
        } else {
            self.ledger.bad_records += 1;
            self.count("bad-record");
        }
        Event {
            target: Address::new(INTAKE, u.sku.clone()).expect("SKU ids are valid ids"),
            value: TypedValue::of(&u).expect("JSON encoding"),
        }
    }

    fn count(&mut self, kind: &str) {
        *self.ledger.counts.entry(kind.to_owned()).or_default() += 1;
    }

    /// The records generated but not returned yet (a duplicate, or an event that a
    /// later one of its basket overtook): send them when the traffic stops.
    pub fn drain(&mut self) -> Vec<Event> {
        self.queue.drain(..).collect()
    }

    /// The next record.
    pub fn next_event(&mut self) -> Event {
        if let Some(e) = self.queue.pop_front() {
            return e;
        }
        let roll: f64 = self.rng.random();
        if roll < self.cfg.bad_ratio {
            return self.bad_record();
        }
        if roll < self.cfg.bad_ratio + 0.04 {
            let s = sku(self.rng.random_range(0..self.cfg.skus));
            let qty = self.rng.random_range(1..=20);
            let mut u = self.product(&s, qty);
            if self.rng.random_bool(0.05) {
                // A new photo of the product now and then.
                u.image = Some(format!("incoming/{}/{s}.png", self.cfg.region));
            }
            return self.warehouse_event(u, true);
        }
        let c = self.rng.random_range(0..self.counters.len());
        self.counter_event(c);
        self.queue.pop_front().unwrap_or_else(|| self.next_event())
    }

    fn bad_record(&mut self) -> Event {
        let s = sku(self.rng.random_range(0..self.cfg.skus));
        match self.rng.random_range(0..4) {
            0 => {
                self.ledger.bad_records += 1;
                self.count("bad-record");
                Event {
                    target: Address::new(INTAKE, s).expect("valid id"),
                    value: TypedValue::from_bytes(WarehouseUpdate::TYPE_NAME, b"{\"sku\": \"SKU-0".to_vec()),
                }
            }
            1 => {
                let mut u = self.product(&s, 5);
                u.price_cents = -100;
                self.warehouse_event(u, false)
            }
            2 => {
                let mut u = self.product(&s, 5);
                u.image = Some(self.corrupt_image_path());
                self.warehouse_event(u, false)
            }
            _ => {
                // A scan of a SKU the region does not carry: the inventory refuses it.
                self.count("unknown-sku-scan");
                let c = self.rng.random_range(0..self.counters.len());
                self.counter_event_with(c, Some("SKU-99999".into()));
                self.queue.pop_front().unwrap_or_else(|| self.next_event())
            }
        }
    }

    fn counter_event(&mut self, c: usize) {
        self.counter_event_with(c, None)
    }

    /// Queues the next event(s) of counter `c`.
    fn counter_event_with(&mut self, c: usize, force_sku: Option<String>) {
        if self.counters[c].is_none() {
            let region = self.cfg.region.clone();
            let id = format!("{region}-B{:07}", self.ledger.baskets.len());
            self.ledger.baskets.push(id.clone());
            let customer = if self.rng.random_bool(0.7) {
                let cust = format!("{region}-C{:05}", self.rng.random_range(0..self.cfg.customers));
                self.customers_seen.insert(cust.clone());
                cust
            } else {
                String::new()
            };
            let roll: f64 = self.rng.random();
            let end = if roll < self.cfg.abandon_ratio {
                End::Abandon
            } else if roll < self.cfg.abandon_ratio + self.cfg.cancel_ratio {
                End::Cancel
            } else {
                End::Checkout
            };
            let per_store = self.cfg.counters_per_store;
            self.counters[c] = Some(OpenBasket {
                id,
                store: format!("{region}-S{}", c / per_store),
                counter: format!("K{}", c % per_store),
                customer,
                seq: 0,
                scans_left: self.rng.random_range(1..=6),
                scanned: Vec::new(),
                end,
            });
        }
        let Some(mut b) = self.counters[c].take() else {
            return;
        };
        let action = if b.scans_left > 0 || force_sku.is_some() {
            let roll: f64 = self.rng.random();
            if roll < 0.05 && !b.scanned.is_empty() {
                let s = b.scanned.choose(&mut self.rng).cloned().unwrap_or_default();
                Some(PosAction::Remove { sku: s })
            } else if roll < 0.08 {
                let code = ["SAVE10", "STAFF20", "BOGUS"][self.rng.random_range(0..3)];
                Some(PosAction::Code { code: code.into() })
            } else {
                b.scans_left = b.scans_left.saturating_sub(1);
                let s = force_sku
                    .clone()
                    .unwrap_or_else(|| sku(self.rng.random_range(0..self.cfg.skus)));
                // The loyalty card is shown with the first item scanned.
                let customer = if b.scanned.is_empty() {
                    b.customer.clone()
                } else {
                    String::new()
                };
                b.scanned.push(s.clone());
                Some(PosAction::Scan { sku: s, customer })
            }
        } else {
            match b.end {
                End::Checkout => Some(PosAction::Checkout),
                End::Cancel => Some(PosAction::Cancel),
                End::Abandon => None,
            }
        };
        let Some(action) = action else {
            self.count("basket-abandoned");
            return; // walked away: the counter takes the next customer
        };
        let last = matches!(action, PosAction::Checkout | PosAction::Cancel);
        b.seq += 1;
        let event = self.pos_event(&b, action);
        self.count("pos-event");
        if self.rng.random_bool(self.cfg.duplicate_ratio) {
            self.count("pos-duplicate");
            self.queue.push_back(event.clone());
        }
        if !last && self.rng.random_bool(self.cfg.reorder_ratio) {
            // The basket's next event overtakes this one.
            self.count("pos-reordered");
            self.counters[c] = Some(b);
            self.counter_event(c);
            self.queue.push_back(event);
            return;
        }
        self.queue.push_back(event);
        if last {
            self.count(if matches!(b.end, End::Checkout) {
                "basket-checkout"
            } else {
                "basket-cancelled"
            });
        } else {
            self.counters[c] = Some(b);
        }
    }

    fn pos_event(&self, b: &OpenBasket, action: PosAction) -> Event {
        let e = PosEvent {
            store: b.store.clone(),
            counter: b.counter.clone(),
            seq: b.seq,
            action,
        };
        Event {
            target: Address::new(CART, b.id.clone()).expect("basket ids are valid ids"),
            value: TypedValue::of(&e).expect("JSON encoding"),
        }
    }
}

/// The id of SKU number `i`.
pub fn sku(i: usize) -> String {
    format!("SKU-{i:05}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn configurations_that_cannot_generate_traffic_are_refused_with_the_reason() {
        assert_eq!(LoadConfig::new("r", 1).validate(), Ok(()));
        type Breaker = fn(&mut LoadConfig);
        let broken: Vec<(Breaker, &str)> = vec![
            (|c| c.skus = 0, "skus"),
            (|c| c.skus = 100_000, "five digits"),
            (|c| c.customers = 0, "customers"),
            (|c| c.bad_ratio = 1.5, "bad-record ratio"),
            (|c| c.abandon_ratio = 0.7, "add up"),
        ];
        for (breakit, says) in broken {
            let mut c = LoadConfig::new("r", 1);
            c.cancel_ratio = 0.5;
            breakit(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.contains(says), "{e:?} does not say {says:?}");
        }
    }

    use super::*;

    #[test]
    fn every_basket_gets_consecutive_sequence_numbers_with_duplicates_and_swaps_only() {
        let mut cfg = LoadConfig::new("r", 7);
        cfg.duplicate_ratio = 0.1;
        cfg.reorder_ratio = 0.1;
        let mut g = Generator::new(cfg);
        let mut seqs: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let mut events: Vec<Event> = (0..5000).map(|_| g.next_event()).collect();
        events.extend(g.drain());
        for e in events {
            if e.target.type_name() == &CART {
                let p: PosEvent = e.value.decode().unwrap();
                seqs.entry(e.target.id().to_owned()).or_default().push(p.seq);
            }
        }
        let (mut dups, mut swaps) = (0, 0);
        for s in seqs.values() {
            let mut sorted = s.clone();
            sorted.sort();
            sorted.dedup();
            dups += s.len() - sorted.len();
            swaps += s.windows(2).filter(|w| w[1] < w[0]).count();
            assert_eq!(sorted, (1..=sorted.len() as u32).collect::<Vec<_>>(), "no gap: {s:?}");
        }
        assert!(dups > 0 && swaps > 0, "duplicates {dups}, swaps {swaps}");
    }
}
