//! product-intake (stateless, for the `warehouse-updates` topic): validates a
//! warehouse's product record, processes its image (decode, dimensions, dominant
//! colour, renditions written back to the object store) and forwards the clean product
//! to the inventory. A record that fails validation goes to the application's
//! dead-letter egress (`retail/rejected`) with the reason, and nothing else happens.

use std::io::Cursor;
use std::sync::Arc;

use image::{DynamicImage, GenericImageView, ImageFormat, imageops::FilterType};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use statefun_sdk::prelude::*;

use crate::functions::reject;
use crate::types::*;
use crate::{INTAKE, INVENTORY};

/// Widths of the stored renditions (only those smaller than the original).
pub const RENDITION_WIDTHS: [u32; 3] = [64, 256, 512];
/// Largest image accepted, in bytes.
pub const MAX_IMAGE_BYTES: usize = 8 << 20;
/// The highest price accepted (1,000,000.00): bills and window revenue stay far from
/// overflowing.
pub const MAX_PRICE_CENTS: i64 = 100_000_000;
/// The most items one warehouse update may deliver.
pub const MAX_DELIVERY: i64 = 1_000_000;
/// Largest image accepted, in pixels per side (guards the decoder's memory).
pub const MAX_IMAGE_SIDE: u32 = 8192;

/// The product-intake function. Images are read from and renditions written to
/// `store` (local filesystem by default; any `object_store` backend works).
#[derive(Clone)]
pub struct ProductIntake {
    store: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for ProductIntake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProductIntake")
            .field("store", &self.store.to_string())
            .finish()
    }
}

impl ProductIntake {
    /// An intake over `store`.
    pub fn new(store: Arc<dyn ObjectStore>) -> ProductIntake {
        ProductIntake { store }
    }

    /// The function's spec (stateless).
    pub fn spec() -> FunctionSpec {
        FunctionSpec::new(INTAKE)
    }
}

/// Checks a warehouse record's fields; the reason on failure.
pub fn validate(u: &WarehouseUpdate) -> Result<(), String> {
    let digits = u.sku.strip_prefix("SKU-").unwrap_or("");
    if digits.len() != 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid SKU {:?}: expected SKU- and five digits", u.sku));
    }
    if u.title.trim().is_empty() {
        return Err("empty title".into());
    }
    if u.description.trim().is_empty() {
        return Err("empty description".into());
    }
    if u.price_cents < 0 {
        return Err(format!("negative price {}", u.price_cents));
    }
    if u.price_cents > MAX_PRICE_CENTS {
        return Err(format!("price {} above the limit {MAX_PRICE_CENTS}", u.price_cents));
    }
    if u.stock < 0 {
        return Err(format!("negative stock count {}", u.stock));
    }
    if u.stock > MAX_DELIVERY {
        return Err(format!("stock count {} above the limit {MAX_DELIVERY}", u.stock));
    }
    if let Some(MultiBuy { buy, pay }) = u.multibuy
        && (buy < 2 || pay < 1 || pay >= buy)
    {
        return Err(format!("invalid multi-buy offer: buy {buy}, pay {pay}"));
    }
    Ok(())
}

/// Why an image was refused (the record is rejected), as opposed to a store failure
/// (the invocation fails and is retried).
#[derive(Debug)]
pub enum ImageError {
    /// The image is missing, too large, or not a decodable PNG/JPEG.
    Invalid(String),
    /// The object store failed.
    Store(object_store::Error),
}

/// Decodes `bytes`, measures it, and writes the renditions under `products/<sku>/`.
pub async fn process_image(store: &dyn ObjectStore, sku: &str, bytes: &[u8]) -> Result<ImageInfo, ImageError> {
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(ImageError::Invalid(format!(
            "image of {} bytes exceeds {MAX_IMAGE_BYTES}",
            bytes.len()
        )));
    }
    let format = image::guess_format(bytes).map_err(|e| ImageError::Invalid(format!("unknown image format: {e}")))?;
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg) {
        return Err(ImageError::Invalid(format!("unsupported image format {format:?}")));
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| ImageError::Invalid(format!("cannot decode the image: {e}")))?;
    let (width, height) = img.dimensions();
    let dominant = dominant_colour(&img);
    let mut renditions = Vec::new();
    for w in RENDITION_WIDTHS.into_iter().filter(|w| *w < width) {
        let h = ((u64::from(height) * u64::from(w)) / u64::from(width)).max(1) as u32;
        let small = img.resize_exact(w, h, FilterType::Triangle).to_rgb8();
        let mut out = Cursor::new(Vec::new());
        small
            .write_to(&mut out, ImageFormat::Jpeg)
            .map_err(|e| ImageError::Invalid(format!("cannot encode a rendition: {e}")))?;
        let path = format!("products/{sku}/{w}.jpg");
        store
            .put(&Path::from(path.as_str()), out.into_inner().into())
            .await
            .map_err(ImageError::Store)?;
        renditions.push(Rendition {
            width: w,
            height: h,
            path,
        });
    }
    Ok(ImageInfo {
        width,
        height,
        dominant,
        renditions,
    })
}

/// The most frequent colour of a 32x32 thumbnail, with channels quantized to 16
/// levels (the centre of the winning bucket).
pub fn dominant_colour(img: &DynamicImage) -> [u8; 3] {
    let thumb = img.resize_exact(32, 32, FilterType::Nearest).to_rgb8();
    let mut counts = vec![0u32; 16 * 16 * 16];
    for p in thumb.pixels() {
        let [r, g, b] = p.0;
        counts[(usize::from(r >> 4) << 8) | (usize::from(g >> 4) << 4) | usize::from(b >> 4)] += 1;
    }
    let (best, _) = counts
        .iter()
        .enumerate()
        .max_by_key(|(i, n)| (**n, std::cmp::Reverse(*i)))
        .unwrap_or((0, &0));
    let centre = |q: usize| ((q as u8) << 4) | 0x08;
    [centre(best >> 8), centre((best >> 4) & 0xf), centre(best & 0xf)]
}

#[async_trait]
impl StatefulFunction for ProductIntake {
    async fn invoke(&self, ctx: &mut Context, msg: Message) -> FunctionResult {
        let key = ctx.self_address().id().to_owned();
        let update: WarehouseUpdate = match msg.decode() {
            Ok(u) => u,
            Err(e) => return reject(ctx, "product-intake", &key, format!("malformed record: {e}")),
        };
        if let Err(reason) = validate(&update) {
            return reject(ctx, "product-intake", &key, reason);
        }
        if update.sku != key {
            // Updates of one SKU must all go through the same intake address (in order).
            let reason = format!("record key {key} is not the product's SKU {}", update.sku);
            return reject(ctx, "product-intake", &key, reason);
        }
        let image = match &update.image {
            None => None,
            Some(path) => {
                let bytes = match self.store.get(&Path::from(path.as_str())).await {
                    Ok(r) if r.meta.size > MAX_IMAGE_BYTES as u64 => {
                        let reason = format!("image {path} is {} bytes (at most {MAX_IMAGE_BYTES})", r.meta.size);
                        return reject(ctx, "product-intake", &key, reason);
                    }
                    Ok(r) => r.bytes().await?,
                    Err(object_store::Error::NotFound { .. }) => {
                        return reject(ctx, "product-intake", &key, format!("image {path} not found"));
                    }
                    Err(e) => return Err(e.into()),
                };
                match process_image(self.store.as_ref(), &update.sku, &bytes).await {
                    Ok(info) => Some(info),
                    Err(ImageError::Invalid(reason)) => {
                        return reject(ctx, "product-intake", &key, format!("image {path}: {reason}"));
                    }
                    Err(ImageError::Store(e)) => return Err(e.into()),
                }
            }
        };
        let product = Product {
            sku: update.sku.clone(),
            title: update.title,
            description: update.description,
            price_cents: update.price_cents,
            image,
            multibuy: update.multibuy,
            discontinued: update.discontinued,
        };
        let cmd = InventoryCmd::Upsert {
            product,
            delivered: update.stock,
        };
        ctx.send(Address::new(INVENTORY, &update.sku)?, &cmd)?;
        Ok(())
    }
}
