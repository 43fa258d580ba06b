//! # inventory-demo: the retail reference application, in-process
//!
//! What it teaches: embedding the runtime in a program, wiring functions, egresses and
//! dead letters, driving it with a workload, querying state, and checking business
//! invariants at the end.
//!
//! Run it: `make demo` (or `cargo run --release -p inventory --bin inventory-demo`).
//! It simulates checkout counters for `--seconds`, prints a live line per second, then
//! waits for abandoned baskets to time out and checks, for every SKU,
//! `on_hand = initial + restocked - sold`, `reserved = items held by open baskets`,
//! no negative stock, and that every completed order was counted once by loyalty and
//! once on the orders egress. It prints PASS or FAIL (and exits non-zero on FAIL).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use inventory::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use statefun_runtime::{CollectingDeadLetters, CollectingEgress, Runtime, RuntimeConfig, RuntimeHandle};
use statefun_sdk::Address;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "Run the retail reference application in-process and check its invariants")]
struct Args {
    /// How long to generate checkout traffic.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Number of SKUs in the store.
    #[arg(long, default_value_t = 50)]
    skus: usize,
    /// Number of customers.
    #[arg(long, default_value_t = 200)]
    customers: usize,
    /// Initial stock per SKU.
    #[arg(long, default_value_t = 40)]
    initial_stock: i64,
    /// Runtime partitions.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// Target counter events per second (0 = as fast as the runtime takes them).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Random seed of the workload.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn sku(i: usize) -> String {
    format!("SKU-{i:05}")
}

async fn send<T: statefun_sdk::ValueType>(h: &RuntimeHandle, addr: Address, v: &T) -> anyhow::Result<()> {
    h.send_value(addr, v).await.context("sending to the runtime")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let orders = CollectingEgress::new();
    let alerts = CollectingEgress::new();
    let dead = CollectingDeadLetters::new();
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            partitions: args.partitions,
            ..Default::default()
        })
        .module(module()?)
        .egress(ORDERS, orders.clone())
        .egress(ALERTS, alerts.clone())
        .dead_letters(dead.clone())
        .build()?;
    let h = runtime.handle();
    let stop = CancellationToken::new();
    let running = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));

    println!(
        "statefun-rs retail demo: {} SKUs x {} initial stock, {} customers, {} partitions, {} s of traffic (in-memory state)",
        args.skus, args.initial_stock, args.customers, args.partitions, args.seconds
    );
    let mut restocked: HashMap<String, i64> = HashMap::new();
    for i in 0..args.skus {
        send(
            &h,
            Address::new(INVENTORY, sku(i))?,
            &InventoryCmd::Restock {
                qty: args.initial_stock,
            },
        )
        .await?;
    }

    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut baskets: Vec<String> = Vec::new();
    let (mut events, mut checkouts, mut cancels, mut abandons) = (0u64, 0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut next_report = Duration::from_secs(1);
    let mut last_events = 0u64;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        // One basket at a counter: scans, then checkout (75%), cancel (10%) or walk away.
        let basket = format!("B-{:07}", baskets.len());
        let cart = Address::new(CART, &basket)?;
        let customer = format!("C-{:04}", rng.random_range(0..args.customers));
        for _ in 0..rng.random_range(1..=4) {
            let scan = CartEvent::Scan {
                sku: sku(rng.random_range(0..args.skus)),
                customer: customer.clone(),
            };
            send(&h, cart.clone(), &scan).await?;
            events += 1;
        }
        let roll = rng.random_range(0..100);
        if roll < 75 {
            send(&h, cart.clone(), &CartEvent::Checkout).await?;
            if rng.random_bool(0.05) {
                send(&h, cart.clone(), &CartEvent::Checkout).await?; // a counter retrying
                events += 1;
            }
            checkouts += 1;
            events += 1;
        } else if roll < 85 {
            send(&h, cart.clone(), &CartEvent::Cancel).await?;
            cancels += 1;
            events += 1;
        } else {
            abandons += 1;
        }
        baskets.push(basket);
        // Warehouses restock now and then.
        if rng.random_bool(0.25) {
            let s = sku(rng.random_range(0..args.skus));
            let qty = rng.random_range(1..=20);
            *restocked.entry(s.clone()).or_default() += qty;
            send(&h, Address::new(INVENTORY, s)?, &InventoryCmd::Restock { qty }).await?;
            events += 1;
        }
        if started.elapsed() >= next_report {
            let invocations: u64 = h.stats().await?.iter().map(|p| p.invocations).sum();
            println!(
                "  t={:>2}s  events/s={:>8}  baskets={:>8}  orders={:>7}  invocations={:>9}",
                next_report.as_secs(),
                events - last_events,
                baskets.len(),
                orders.records().len(),
                invocations
            );
            last_events = events;
            next_report += Duration::from_secs(1);
        }
        if baskets.len().is_multiple_of(64) {
            if args.rate > 0 {
                let due = Duration::from_secs_f64(events as f64 / args.rate as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(ahead).await;
                }
            }
            tokio::task::yield_now().await;
        }
    }
    let gen_secs = started.elapsed().as_secs_f64();
    h.wait_idle().await;
    println!(
        "traffic done: {events} counter events in {gen_secs:.1} s ({:.0} events/s); waiting for abandoned baskets to time out...",
        events as f64 / gen_secs
    );
    // Abandoned baskets release their reservations when their timer fires.
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        h.wait_idle().await;
        let pending: usize = h.stats().await?.iter().map(|p| p.pending_delayed).sum();
        if pending == 0 {
            break;
        }
    }

    // ---- What happened ----
    let mut sold_per_sku: BTreeMap<String, i64> = BTreeMap::new();
    let mut held_per_sku: BTreeMap<String, i64> = BTreeMap::new();
    let mut completed = HashMap::new();
    let mut rejected = 0;
    let mut non_empty_orders = 0;
    for b in &baskets {
        let state = h.state(&Address::new(CART, b)?, &BASKET).await?.unwrap_or_default();
        rejected += state.rejected;
        let target = match state.status {
            BasketStatus::Completed => {
                if state.items.values().sum::<i64>() > 0 {
                    non_empty_orders += 1;
                }
                completed.insert(b.clone(), state.customer.clone());
                &mut sold_per_sku
            }
            BasketStatus::Open | BasketStatus::CheckingOut => &mut held_per_sku,
            BasketStatus::Released => continue,
        };
        for (s, q) in state.items {
            *target.entry(s).or_default() += q;
        }
    }
    let mut failures = Vec::new();
    let (mut total_on_hand, mut total_sold) = (0, 0);
    for i in 0..args.skus {
        let s = sku(i);
        let stock = h
            .state(&Address::new(INVENTORY, &s)?, &STOCK)
            .await?
            .unwrap_or_default();
        let sold = sold_per_sku.get(&s).copied().unwrap_or(0);
        let expected = args.initial_stock + restocked.get(&s).copied().unwrap_or(0) - sold;
        total_on_hand += stock.on_hand;
        total_sold += sold;
        if stock.on_hand != expected {
            failures.push(format!(
                "{s}: on_hand {} != initial + restocked - sold = {expected}",
                stock.on_hand
            ));
        }
        let held = held_per_sku.get(&s).copied().unwrap_or(0);
        if stock.reserved != held {
            failures.push(format!(
                "{s}: reserved {} != held by open baskets {held}",
                stock.reserved
            ));
        }
        if stock.on_hand < 0 || stock.reserved < 0 {
            failures.push(format!("{s}: negative stock {stock:?}"));
        }
    }
    // Every completed order counted once on the egress and once by loyalty.
    let mut egress_count: HashMap<String, usize> = HashMap::new();
    for r in orders.records() {
        *egress_count
            .entry(r.message.decode::<OrderSummary>()?.basket)
            .or_default() += 1;
    }
    for b in completed.keys() {
        if egress_count.get(b) != Some(&1) {
            failures.push(format!(
                "order {b} appears {:?} times on the orders egress",
                egress_count.get(b)
            ));
        }
    }
    if egress_count.len() != completed.len() {
        failures.push(format!(
            "{} orders on the egress, {} completed baskets",
            egress_count.len(),
            completed.len()
        ));
    }
    let mut points = 0;
    let mut credited = 0;
    let mut customers: Vec<&String> = completed.values().collect();
    customers.sort();
    customers.dedup();
    for c in customers {
        if c.is_empty() {
            continue;
        }
        let acc = h.state(&Address::new(LOYALTY, c)?, &ACCOUNT).await?.unwrap_or_default();
        points += acc.points;
        credited += acc.orders;
    }
    if credited != non_empty_orders {
        failures.push(format!(
            "loyalty credited {credited} orders, {non_empty_orders} non-empty orders completed"
        ));
    }
    if points != total_sold * POINTS_PER_ITEM {
        failures.push(format!(
            "loyalty points {points} != items sold {total_sold} x {POINTS_PER_ITEM}"
        ));
    }
    let letters = dead.letters();
    if !letters.is_empty() {
        failures.push(format!("{} dead letters, first: {}", letters.len(), letters[0].reason));
    }

    stop.cancel();
    let report = running.await??;
    println!();
    println!(
        "baskets: {} ({checkouts} checkouts, {cancels} cancelled, {abandons} abandoned)",
        baskets.len()
    );
    println!(
        "orders completed: {} ({credited} credited to loyalty), items sold: {total_sold}, items refused for lack of stock: {rejected}",
        completed.len()
    );
    println!(
        "stock left in store: {total_on_hand}, low-stock alerts: {}",
        alerts.records().len()
    );
    println!("invocations: {}, loyalty points issued: {points}", report.invocations());
    if failures.is_empty() {
        println!("invariant check: PASS");
        Ok(())
    } else {
        println!("invariant check: FAIL");
        for f in failures.iter().take(20) {
            println!("  - {f}");
        }
        bail!("{} invariant violations", failures.len())
    }
}
