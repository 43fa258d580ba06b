//! The application's messages, states and egress records (JSON on the wire, so a Kafka
//! producer in any language can write the input topics).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use statefun_sdk::json_type;

/// A record of the `warehouse-updates` topic: a product as a warehouse describes it,
/// with the stock it delivers to the region. Goes to product-intake (key = SKU).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WarehouseUpdate {
    /// Sending warehouse.
    pub warehouse: String,
    /// `SKU-` and five digits.
    pub sku: String,
    /// Product title, not empty.
    pub title: String,
    /// Product description, not empty.
    pub description: String,
    /// Unit price in cents, >= 0.
    pub price_cents: i64,
    /// Items delivered with this update, >= 0.
    pub stock: i64,
    /// Object-store path of the product image (PNG or JPEG), if it changed.
    #[serde(default)]
    pub image: Option<String>,
    /// A multi-buy offer ("buy 3, pay 2").
    #[serde(default)]
    pub multibuy: Option<MultiBuy>,
    /// The product leaves the range: no new reservations.
    #[serde(default)]
    pub discontinued: bool,
}
json_type!(WarehouseUpdate, "retail/WarehouseUpdate");

/// A multi-buy promotion: every `buy` items of the SKU in a basket cost `pay`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiBuy {
    /// Items per group.
    pub buy: i64,
    /// Items paid per group.
    pub pay: i64,
}

/// What product-intake learned from a product image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ImageInfo {
    /// Original width in pixels.
    pub width: u32,
    /// Original height in pixels.
    pub height: u32,
    /// Dominant colour, RGB.
    pub dominant: [u8; 3],
    /// Stored renditions (JPEG), smallest first.
    pub renditions: Vec<Rendition>,
}

/// One stored size of a product image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Rendition {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Object-store path.
    pub path: String,
}

/// A validated product record, as the inventory keeps it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Product {
    /// The SKU.
    pub sku: String,
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Unit price in cents.
    pub price_cents: i64,
    /// Image facts, once an image was processed.
    pub image: Option<ImageInfo>,
    /// Multi-buy offer.
    pub multibuy: Option<MultiBuy>,
    /// No new reservations.
    pub discontinued: bool,
}
json_type!(Product, "retail/Product");

/// Commands to an inventory address (id = SKU).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum InventoryCmd {
    /// A validated warehouse update from product-intake: the product record (the image
    /// facts are kept when the update had no new image) and the stock delivered.
    Upsert { product: Product, delivered: i64 },
    /// Hold `qty` for a basket; answered with a [`CartEvent::Reserved`].
    Reserve { basket: String, qty: i64 },
    /// Return a basket's hold.
    Release { qty: i64 },
    /// The basket was paid: the held items leave the store, sold at `price_cents` each
    /// (the price the basket's reservations were answered with: what the bill charged).
    Commit { qty: i64, price_cents: i64 },
    /// The analytics window timer fired.
    FlushWindow,
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

/// The analytics window an inventory address is filling.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct WindowAcc {
    /// Window number of this SKU (0, 1, ...).
    pub seq: u64,
    /// Whether a window is open (its flush timer armed).
    pub open: bool,
    /// Items sold in the window.
    pub sold: i64,
    /// Revenue at list price, in cents.
    pub revenue_cents: i64,
    /// Items delivered in the window.
    pub delivered: i64,
}
json_type!(WindowAcc, "retail/WindowAcc");

/// A record of the `pos-events` topic: one event at a checkout counter (key = basket id).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PosEvent {
    /// Store id.
    pub store: String,
    /// Counter id within the store.
    pub counter: String,
    /// The counter's sequence number within the basket, from 1. Repeated numbers are
    /// duplicates; a gap holds later events back until it is filled.
    pub seq: u32,
    /// What happened.
    pub action: PosAction,
}
json_type!(PosEvent, "retail/PosEvent");

/// What a checkout counter reports.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum PosAction {
    /// An item scanned; `customer` is the loyalty card, if shown (empty if not).
    Scan { sku: String, customer: String },
    /// An item taken back off the basket.
    Remove { sku: String },
    /// A promotion code typed in.
    Code { code: String },
    /// The customer pays.
    Checkout,
    /// The customer walks away at the counter.
    Cancel,
}

/// Messages between the application's functions for a cart address.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum CartEvent {
    /// The inventory's answer to a reservation, with the price and offer it applies.
    Reserved {
        sku: String,
        qty: i64,
        ok: bool,
        price_cents: i64,
        multibuy: Option<MultiBuy>,
    },
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
    /// Cancelled, or checked out empty; reservations returned.
    Released,
    /// No counter event for `abandon_after`: reservations returned. A later counter
    /// event revives the basket (its items are reserved again).
    Abandoned,
}

/// State of one basket.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Basket {
    /// Store.
    pub store: String,
    /// Customer id (empty if no loyalty card).
    pub customer: String,
    /// The next counter sequence number to apply.
    pub next_seq: u32,
    /// Counter events that arrived ahead of a gap.
    pub early: BTreeMap<u32, PosAction>,
    /// Reserved items per SKU.
    pub items: BTreeMap<String, i64>,
    /// Unit price and offer per SKU, as the inventory answered.
    pub prices: BTreeMap<String, (i64, Option<MultiBuy>)>,
    /// Reservations asked for and not answered yet, per SKU.
    pub pending: BTreeMap<String, i64>,
    /// Removals waiting for a pending reservation of the SKU.
    pub removals: BTreeMap<String, i64>,
    /// The promotion code applied, if any.
    pub code: Option<String>,
    /// Items the inventory could not reserve (out of stock, unknown or discontinued).
    pub rejected: i64,
    /// Where the basket is.
    pub status: BasketStatus,
    /// The bill, once completed.
    pub bill: Option<Bill>,
    /// What the basket held (reserved or asked for) when it was abandoned: reserved again
    /// if the counter comes back.
    pub abandoned: BTreeMap<String, i64>,
}
json_type!(Basket, "retail/Basket");

/// The bill of a completed basket.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bill {
    /// Items bought.
    pub items: i64,
    /// At list price, in cents.
    pub gross_cents: i64,
    /// Multi-buy and code discounts, in cents.
    pub discount_cents: i64,
    /// Paid, in cents.
    pub total_cents: i64,
}

/// A completed order, for central analytics (egress `retail/orders`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct OrderSummary {
    /// Region.
    pub region: String,
    /// Store.
    pub store: String,
    /// Basket id.
    pub basket: String,
    /// Customer id (empty if none).
    pub customer: String,
    /// The bill.
    pub bill: Bill,
}
json_type!(OrderSummary, "retail/OrderSummary");

/// Per-SKU aggregate of one window, for central analytics (egress `retail/sku-windows`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SkuWindow {
    /// Region.
    pub region: String,
    /// SKU.
    pub sku: String,
    /// Window number of this SKU.
    pub seq: u64,
    /// Items sold in the window.
    pub sold: i64,
    /// Revenue at list price, in cents.
    pub revenue_cents: i64,
    /// Items delivered in the window.
    pub delivered: i64,
    /// Items in the store at the window's end.
    pub on_hand: i64,
}
json_type!(SkuWindow, "retail/SkuWindow");

/// A low-stock alert (egress `retail/alerts`, for the region's store operations).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LowStock {
    /// The SKU.
    pub sku: String,
    /// Available items left.
    pub available: i64,
}
json_type!(LowStock, "retail/LowStock");

/// A record the application refused (egress `retail/rejected`, its dead-letter output).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Which function refused it.
    pub function: String,
    /// The record's key (address id).
    pub key: String,
    /// Why.
    pub reason: String,
}
json_type!(Rejected, "retail/Rejected");

/// A purchase credited to a customer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Purchase {
    /// Basket id (each is credited once).
    pub basket: String,
    /// Items per SKU.
    pub lines: BTreeMap<String, i64>,
    /// Paid, in cents.
    pub total_cents: i64,
}
json_type!(Purchase, "retail/Purchase");

/// Loyalty tier, by lifetime spend.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Tier {
    /// From the first purchase.
    #[default]
    Bronze,
    /// From 200.00 spent.
    Silver,
    /// From 1000.00 spent.
    Gold,
}

/// Loyalty account of a customer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Account {
    /// Points earned.
    pub points: i64,
    /// Orders credited.
    pub orders: i64,
    /// Lifetime spend in cents.
    pub spend_cents: i64,
    /// Tier.
    pub tier: Tier,
    /// Items bought per SKU (the purchase-history summary).
    pub bought: BTreeMap<String, i64>,
    /// The last credited baskets (a repeated purchase is credited once).
    pub recent: Vec<String>,
    /// A product to suggest: the customer's most bought SKU that was not in the last
    /// purchase.
    pub recommendation: Option<String>,
}
json_type!(Account, "retail/Account");
